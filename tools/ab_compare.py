"""Speed of this checkout against an earlier revision, as a ratio measured in one run.

``python tools/ab_compare.py REV {layer,demo} [--repeats 3] [--out FILE.json]``

These machines are shared and noisy: two numbers taken at different times are not comparable,
but two measured alternately, the same number of times, under the same load are. REV is checked
out into a temporary ``git worktree``; each round runs the same measurement first from REV, then
from this checkout (alternating which goes first), each in its own process with its own tree on
``PYTHONPATH``, and keeps each side's best:

- ``layer``: ``tools/bench_layer_cpu.py`` (our MoE layer, EP 2, 2 processes, oneDNN experts, no
  DeepSpeed), tokens/s of our layer;
- ``demo``: ``moe-dist train configs/demo.yaml`` for ``--steps`` steps on 2 processes (EP 2,
  log every step, no evaluation or checkpoint inside), the median tokens/s of the steps after
  the first three (metrics.jsonl).

Prints both, and new / old, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}


def _layer(tree: Path, tmp: Path) -> float:
    out = tmp / "layer.json"
    cmd = [sys.executable, str(tree / "tools" / "bench_layer_cpu.py"), "--no-deepspeed", "--repeats", "2",
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=tree, env=_env(tree), check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    return max(r["tokens_per_s"] for r in rows if r.get("impl") == "ours" and "tokens_per_s" in r)


def _demo(tree: Path, tmp: Path, steps: int) -> float:
    sets = [f"schedule.steps={steps}", "schedule.warmup_steps=2", "run.log_every=1", "eval.every=0",
            "eval.batches=1", "checkpoint.every=0", "data.max_bytes=2000000", f"run.out_dir={tmp}",
            "run.name=demo", "run.threads=1"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moe_dist.cli", "train", "configs/demo.yaml"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=tree, env=_env(tree), check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (tmp / "demo" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 3)


def compare(rev: str, what: str, repeats: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old_tree = tmp / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), rev], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            samples: dict[str, list[float]] = {"old": [], "new": []}
            for i in range(repeats):
                order = [("old", old_tree), ("new", ROOT)]
                for side, tree in order if i % 2 == 0 else order[::-1]:
                    work = tmp / f"{side}{i}"
                    work.mkdir()
                    value = _layer(tree, work) if what == "layer" else _demo(tree, work, steps)
                    samples[side].append(value)
                    print(f"round {i + 1}: {side} {value:,.0f} tok/s", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True
            )
    old, new = max(samples["old"]), max(samples["new"])
    return {
        "rev": rev,
        "measure": what,
        "samples": samples,
        "old_best": old,
        "new_best": new,
        "ratio": new / old,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rev", help="the earlier revision (a commit, tag or branch)")
    p.add_argument("measure", choices=["layer", "demo"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="demo: steps per run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = compare(args.rev, args.measure, args.repeats, args.steps)
    old, new, ratio = out["old_best"], out["new_best"], out["ratio"]
    print(f"{args.measure}: {args.rev} {old:,.0f} tok/s, this checkout {new:,.0f} tok/s, ratio {ratio:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
