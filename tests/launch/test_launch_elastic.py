"""Elastic restart: a rank killed mid-run makes torchrun restart the group, which resumes.

``max_restarts: 1`` and ``train --resume`` (the latest checkpoint of the run, or a fresh start
when there is none). We SIGKILL rank 1 once a checkpoint exists and training has moved past
it; torchrun tears the group down, starts it again, the new ranks load the checkpoint and the
run finishes with the same losses as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import (
    descendants,
    kill_tree,
    launch_cmd,
    logged_losses,
    run_launch,
    tiny_train,
    write_cluster,
)

pytestmark = pytest.mark.slow
STEPS, EVERY, KILL_AFTER = 40, 10, 12


def worker_with_rank(launcher_pid: int, rank: int) -> int | None:
    """The descendant of our own launch process whose environment says RANK=rank (first attempt)."""
    for pid in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return pid
    return None


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x).get("step", 0) for x in lines if x.endswith("}")]
    return max(steps, default=0)


def test_killed_rank_restarts_group_and_resumes(tmp_path: Path) -> None:
    more = ["--set", f"schedule.steps={STEPS}", "--set", f"checkpoint.every={EVERY}", "--resume"]
    env = {"OMP_NUM_THREADS": 1}
    # the uninterrupted reference
    ref = write_cluster(tmp_path, "ref", {"backend": "local", "procs_per_node": 2, "env": env})
    run_launch(ref, tiny_train(tmp_path, tmp_path / "ref", *more), tmp_path)
    want = logged_losses(tmp_path / "ref" / "tiny")
    assert sorted(want) == list(range(1, STEPS + 1))

    cluster = write_cluster(
        tmp_path, "elastic", {"backend": "local", "procs_per_node": 2, "max_restarts": 1, "env": env}
    )
    log = (tmp_path / "elastic.log").open("w")
    proc = subprocess.Popen(
        launch_cmd(cluster, tiny_train(tmp_path, tmp_path / "runs", *more)),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while last_step(metrics) < KILL_AFTER:
            assert proc.poll() is None, (tmp_path / "elastic.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "training did not reach the kill point"
            time.sleep(0.02)
        victim = worker_with_rank(proc.pid, 1)
        assert victim is not None, "rank 1 not found among the launch's descendants"
        killed_at = last_step(metrics)
        os.kill(victim, signal.SIGKILL)
        assert killed_at < STEPS, "the run ended before the kill: make it longer"
        code = proc.wait(timeout=240)
    finally:
        kill_tree(proc)
        log.close()
    output = (tmp_path / "elastic.log").read_text()
    assert code == 0, output[-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", output)]
    assert len(resumed) == 1 and resumed[0] % EVERY == 0 and EVERY <= resumed[0] <= killed_at, output[-4000:]
    got = logged_losses(tmp_path / "runs" / "tiny")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
