"""``moe-dist demo``: train configs/demo.yaml with EP=2 on 2 local processes, then show the load.

1. Validate the config and the data here, before any process starts (errors stay one line).
2. Launch ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m moe_dist.cli train``
   with one intra-op thread per process and telemetry on (a Prometheus exporter per rank; the
   URLs are printed). Without the telemetry module, telemetry is off and the demo says so.
3. Print the per-layer expert-load table of the whole run (tokens per expert, Gini, min/max)
   and where the metrics log and the checkpoints are.
4. Print a short greedy sample from the final checkpoint, as ``moe-dist generate`` does
   (``continue_prompt``: 60 tokens, bytes with the demo's tokenizer, KV cache; under a second).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from moe_dist.commands.generate import continue_prompt
from moe_dist.config import Config, load_config
from moe_dist.data.batches import TokenBatches
from moe_dist.shipped_files import resolve_user_path

DEMO_CONFIG = "configs/demo.yaml"  # the working directory's, else the shipped one (shipped_files)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train the demo model with EP=2 on 2 local processes")
    p.add_argument(
        "--config",
        default=DEMO_CONFIG,
        help="config to run (default: configs/demo.yaml here, else the copy shipped with moe_dist)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    p.add_argument("--no-telemetry", action="store_true", help="run without the Prometheus exporters")
    p.set_defaults(func=demo_main)


def telemetry_available() -> str | None:
    """None when the exporter can run here, else why not."""
    for module in ("prometheus_client", "moe_dist.telemetry.handle", "moe_dist.telemetry.exporter"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except ModuleNotFoundError:
            return f"{module} is not installed"
    return None


def load_table(summary: dict) -> str:
    """Per-layer expert load of the whole run: tokens per expert, Gini, min/max ratio."""
    import torch

    from moe_dist.metrics import gini, min_max_ratio

    lines = []
    for layer in summary["layers"]:
        counts = torch.tensor(layer["counts"], dtype=torch.float64)
        shares = " ".join(f"{int(c):>7,}" for c in counts.tolist())
        lines.append(
            f"  layer {layer['layer']:>2}  gini {gini(counts):.3f}  "
            f"min/max {min_max_ratio(counts):.3f}  tokens {shares}"
        )
    experts = len(summary["layers"][0]["counts"]) if summary["layers"] else 0
    header = f"Expert load over the whole run (token-slots per expert 0..{experts - 1}, all ranks):"
    return "\n".join([header, *lines])


def demo_main(args: argparse.Namespace) -> int:
    args.config = str(resolve_user_path(args.config))  # the workers get the same file
    overrides = [f"parallel.ep_size={args.nproc}", "run.threads=1", *args.set]
    reason = "--no-telemetry" if args.no_telemetry else telemetry_available()
    overrides.append(f"telemetry.enabled={'false' if reason else 'true'}")
    cfg: Config = load_config(args.config, overrides, world_size=args.nproc)
    TokenBatches.for_run(cfg)  # data errors now

    print(
        f"moe-dist demo: {args.config}, {args.nproc} processes, EP={cfg.parallel.ep_size}, "
        f"{cfg.schedule.steps} steps, {cfg.model.n_layers} layers x {cfg.model.moe.num_experts} experts "
        f"top-{cfg.model.moe.router.top_k}",
        flush=True,
    )
    if reason:
        print(f"telemetry: off ({reason})", flush=True)
    else:
        t = cfg.telemetry
        if t.port_base:
            urls = ", ".join(f"http://{t.bind}:{t.port_base + r}/metrics" for r in range(args.nproc))
            print(f"telemetry: Prometheus exporters at {urls} (while training)", flush=True)
        else:
            print("telemetry: Prometheus exporters on ports the OS picks (port_base: 0)", flush=True)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if run_dir.exists():
        print(f"starting fresh: removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "moe_dist.cli",
        "train",
        args.config,
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"moe-dist demo: training failed (exit code {rc})", file=sys.stderr)
        return rc
    summary = json.loads((run_dir / "summary.json").read_text())
    print()
    print(load_table(summary))
    val = summary.get("val_loss")
    print(
        f"\nfinal validation loss {val:.4f}; "
        f"{summary['tokens_per_s']:,.0f} tokens/s over {summary['seconds']:.0f} s"
    )
    print(f"metrics log:  {summary['metrics_log']}")
    print(f"checkpoints:  {summary['checkpoints']}")
    print(
        "continue training: python -m torch.distributed.run --standalone --nproc-per-node="
        f"{args.nproc} -m moe_dist.cli train {args.config} --set parallel.ep_size={args.nproc} "
        f"--set run.out_dir={cfg.run.out_dir} --set schedule.steps={2 * cfg.schedule.steps} --resume"
    )
    prompt = "def "
    sample = continue_prompt(run_dir, prompt, 60, fit_context=True)
    print(f"\ngreedy sample (moe-dist generate {run_dir} --prompt {prompt!r} --max-new-tokens 60):")
    print("\n".join(f"  | {line}" for line in sample.splitlines()))
    return 0
