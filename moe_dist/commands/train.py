"""``moe-dist train CONFIG [--set k=v ...] [--resume [PATH]]``: one run of either engine."""

from __future__ import annotations

import sys
from typing import Any

from moe_dist.config import load_config
from moe_dist.config.advice import config_warnings
from moe_dist.parallel.startup import launch_info
from moe_dist.training.checkpoint_choice import finished_run
from moe_dist.training.engines import engine_for
from moe_dist.training.preemption import EXIT_RESUMABLE
from moe_dist.training.run import train


def train_main(args: Any) -> int:
    """``moe-dist train CONFIG [--set k=v ...] [--resume [PATH]]``."""
    # the launch's world size: its errors come with the config's, all at once
    launch = launch_info()
    cfg = load_config(args.config, args.set, world_size=launch.world_size)
    if launch.rank == 0:
        for line in config_warnings(cfg):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    if args.resume is not None:
        finished = finished_run(args.resume, cfg.run_dir / "checkpoints", cfg.schedule.steps)
        if finished is not None:  # every rank reads the same files and stops alike, before any collective
            if launch.rank == 0:
                print(finished, file=sys.stderr, flush=True)  # where train's console lines go
            return 0
    result = train(cfg, engine_for(cfg), resume=args.resume)
    # stopped by a signal or run.max_minutes after saving: a code torchrun and SLURM restart on
    return EXIT_RESUMABLE if result.stop_reason is not None else 0


def add_train_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (run under torchrun/mpirun/srun for several processes)",
        description="Train the MoE transformer described by CONFIG.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="resume from PATH (a checkpoints dir or one step_* dir); alone: this run's latest checkpoint, "
        "or a fresh start if it has none",
    )
    p.set_defaults(func=train_main)
