"""``moe-dist check CONFIG [--set k=v ...] [--world-size N]``: validate without training.

Prints the resolved config (defaults filled in, plugin sections expanded) as YAML, then the
warnings of ``config.advice`` as comments, or every error at once with its dotted path (exit
code 2).

The launch shape is part of the check, as ``train`` sees it (``config.world_size_errors``):

- ``--world-size N`` (or ``WORLD_SIZE`` in the environment): its errors join the config's.
- otherwise the check assumes the smallest world size the config allows (``parallel.ep_size``
  processes; 2 under ``fsdp``) and says so; when ``moe-dist train CONFIG`` in one process
  (no launcher) would be refused, it says that too, with the reason ``train`` would give.
"""

from __future__ import annotations

import argparse
import os

import yaml

from moe_dist.config import Config, config_to_dict, load_config, world_size_errors
from moe_dist.config.advice import config_warnings
from moe_dist.data.corpus import check_paths

DESCRIPTION = (
    "Validate CONFIG with its --set overrides as `moe-dist train` would, without training: print the "
    "resolved config (defaults filled in, router and loss sections expanded) as YAML, or every error "
    "at once with its dotted path (exit code 2). Also checks the data paths and the tokenizer against "
    "model.vocab_size. The launch shape is checked for --world-size N; without it, for the smallest "
    "world size the config allows (said in the last line), and a config that one process cannot "
    "train is named."
)


def add_check_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate a config and print it resolved, without training",
        description=DESCRIPTION,
        epilog="example: moe-dist check configs/demo.yaml --set schedule.steps=50 --world-size 2",
    )
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "0")) or None,
        help="check for this many processes (default: WORLD_SIZE, else the smallest that fits)",
    )
    p.set_defaults(func=check_main)


def smallest_world_size(cfg: Config) -> int:
    """The fewest processes ``train`` accepts for ``cfg``: ``ep_size`` of them, 2 under fsdp."""
    size = cfg.parallel.ep_size
    return size if not world_size_errors(cfg, size) else 2 * size


def check_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set, world_size=args.world_size)
    check_paths(cfg.data, cfg.model.vocab_size)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    for line in config_warnings(cfg):
        print(f"# warning: {line}", flush=True)
    if args.world_size:
        print(f"# {args.config}: OK for {args.world_size} process(es)", flush=True)
        return 0
    assumed = smallest_world_size(cfg)
    alone = world_size_errors(cfg, 1)
    if alone:
        print(
            f"# one process (`moe-dist train` without a launcher) is refused: {'; '.join(alone)}",
            flush=True,
        )
    print(
        f"# {args.config}: OK for {assumed} process(es) (assumed: the fewest this config allows; "
        "check a launch with --world-size N)",
        flush=True,
    )
    return 0
