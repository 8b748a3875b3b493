"""A real SIGTERM to a 2-rank training run (torchrun forwards it to both workers, as SLURM's
preemption and wall-time limit deliver it): both ranks finish the current step, checkpoint the
SAME step, and exit with 143; ``--resume`` then continues to the losses of an uninterrupted run.
``run.max_minutes`` ends a run the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import tiny_data

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


def _config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    data = tiny_data(tmp_path, f"run.name={name}", f"schedule.steps={STEPS}", "checkpoint.every=0")
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(config: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moe_dist.cli", "train", str(config), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_sigterm_checkpoints_the_same_step_on_both_ranks_and_resume_continues(tmp_path: Path) -> None:
    whole = _torchrun(_config(tmp_path, "whole"))
    config = _config(tmp_path, "cut")
    run_dir = tmp_path / "runs" / "cut"
    proc = _torchrun(config)
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(_losses(run_dir)) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the agent forwards it to both workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "SIGTERM received, stopping after step" in out, out
    stopped = int(out.split("SIGTERM received, stopping after step ")[1].split(";")[0].split()[0])
    assert 5 <= stopped < STEPS
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{stopped:06d}"
    meta = json.loads((ckpt / f"step_{stopped:06d}" / "meta.json").read_text())
    assert meta["step"] == stopped and {"rng_rank0.pt", "rng_rank1.pt"} <= set(meta["files"]), meta
    assert max(_losses(run_dir)) == stopped  # every step up to the stop is logged, none after
    assert "resume with --resume (exit code 143)" in out, out

    resumed = _torchrun(config, "--resume")
    out_resumed, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out_resumed
    assert f"at step {stopped}" in out_resumed
    whole_out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_out
    want, got = _losses(tmp_path / "runs" / "whole"), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_max_minutes_stops_saves_and_exits_resumable(tmp_path: Path) -> None:
    """One process, a time limit shorter than one step (0.0001 minutes): it stops after the first
    step, saves it, and the command exits 143 (the code torchrun and SLURM restart on)."""
    config = _config(tmp_path, "timed")
    cmd = [sys.executable, "-m", "moe_dist.cli", "train", str(config), "--set", "parallel.ep_size=1",
           "--set", "run.max_minutes=0.0001"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert "run.max_minutes (0.0001) reached, stopping after step 1" in proc.stderr
    assert (tmp_path / "runs" / "timed" / "checkpoints" / "latest").read_text().strip() == "step_000001"


def test_sigterm_after_the_last_step_ends_the_process_at_once(tmp_path: Path) -> None:
    """After the loop (here: an exporter lingering 600 s for a last scrape) SIGTERM is no longer
    held for a step boundary: the process ends within seconds, as a test's or an agent's cleanup
    expects. Before the fix, the flag swallowed it and the process lingered on."""
    config = _config(tmp_path, "linger")
    telemetry = {"enabled": True, "port_base": 0, "linger_s": 600}
    cmd = [sys.executable, "-m", "moe_dist.cli", "train", str(config), "--set", "parallel.ep_size=1",
           "--set", "schedule.steps=3", "--set", f"telemetry={json.dumps(telemetry)}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    summary = tmp_path / "runs" / "linger" / "summary.json"
    deadline = time.monotonic() + 180
    while not summary.exists():  # written just before the exporters linger
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, proc.communicate()[1]
