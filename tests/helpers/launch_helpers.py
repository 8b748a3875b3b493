"""Running ``moe-dist launch`` for real in tests: a tiny train command and its logged losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from train_helpers import TINY_TEXT

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "assets" / "tiny.yaml"


def tiny_train(tmp: Path, out_dir: Path, *more: str) -> list[str]:
    """``train tests/assets/tiny.yaml`` on a small corpus in ``tmp``, logging under ``out_dir``."""
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TINY_TEXT)
    return [
        "train",
        str(TINY),
        "--set",
        f"data.paths=[{json.dumps(str(corpus))}]",
        "--set",
        f"run.out_dir={json.dumps(str(out_dir))}",
        *more,
    ]


def write_cluster(tmp: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "launch_dir": str(tmp / "launch"), **data}))
    return path


def launch_cmd(cluster: Path, train: list[str], *opts: str) -> list[str]:
    return [sys.executable, "-m", "moe_dist.cli", "launch", str(cluster), *opts, "--", *train]


def run_launch(
    cluster: Path, train: list[str], cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess:
    out = subprocess.run(launch_cmd(cluster, train), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"launch failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    )
    return out


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from rank 0's metrics.jsonl (evaluation lines have no ``loss``)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses[int(rec["step"])] = float(rec["loss"])
    return losses


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (from /proc), children first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = [int(x) for x in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch we started and everything it started (a failed test leaves nothing behind)."""
    if proc.poll() is None:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()
