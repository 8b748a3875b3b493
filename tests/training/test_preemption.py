"""``training/preemption.py``: a real SIGTERM to ONE of 2 gloo ranks stops both after the same
step; a time limit reached on one rank's clock stops both at once; one process needs no
collective; the handlers come back after ``close``; torchrun restarts a worker that exits with
``EXIT_RESUMABLE``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rank_processes import run_on_ranks

from moe_dist.config import load_config
from moe_dist.training.preemption import EXIT_RESUMABLE, StopDecision

SIGNAL_AT, STEPS = 3, 40


def _two_rank_body(rank: int, world_size: int) -> dict:
    """1. Rank 0 sends a real SIGTERM to rank 1's process after its step 3; both step until told.
    2. A time limit that only rank 1's clock has passed (it started 2 minutes ago)."""
    import torch.distributed as dist

    pids: list[int | None] = [None, None]
    dist.all_gather_object(pids, os.getpid())
    stop = StopDecision.start()
    assert stop.group is not None and dist.get_backend(stop.group) == "gloo"  # the flag's own group
    reason, stopped_at = None, None
    for step in range(1, STEPS + 1):
        time.sleep(0.02)  # the step's work
        if rank == 0 and step == SIGNAL_AT:
            os.kill(pids[1], signal.SIGTERM)
        reason = stop.stop_reason(step)
        if reason is not None:
            stopped_at = step
            break
    received = stop.flag.received
    stop.close()
    restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    started = time.monotonic() - (120 if rank == 1 else 0)
    clock = StopDecision.start(max_minutes=1.0, started_at=started)
    timed = clock.stop_reason(1)
    local = clock.local_code()
    clock.close()
    return {
        "reason": reason,
        "step": stopped_at,
        "received": received,
        "restored": restored,
        "timed": timed,
        "local": local,
    }


@pytest.mark.slow
def test_two_ranks_agree_on_a_signal_to_one_and_on_one_clock() -> None:
    r0, r1 = run_on_ranks(_two_rank_body, 2)
    # SIGTERM: only rank 1 got it, both stop after the same step
    assert r0["received"] == 0 and r1["received"] == signal.SIGTERM
    assert r0["step"] == r1["step"] is not None and SIGNAL_AT <= r0["step"] < STEPS
    assert r0["reason"] == r1["reason"] == f"SIGTERM received, stopping after step {r0['step']}"
    assert r0["restored"] and r1["restored"]
    # time limit: rank 0 alone would go on; both stop at step 1
    assert r0["local"] == 0
    assert r0["timed"] == r1["timed"] == "run.max_minutes (1) reached, stopping after step 1"


def test_one_process_stops_on_its_own_signal_without_a_group() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopDecision.start(max_minutes=60)
    try:
        assert stop.group is None and not stop.distributed
        assert stop.stop_reason(1) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # what sbatch --signal=USR1@T sends
        assert stop.stop_reason(2) == "SIGUSR1 received, stopping after step 2"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_max_minutes_is_a_run_option() -> None:
    assert load_config(None, ["run.max_minutes=30"]).run.max_minutes == 30
    assert load_config(None).run.max_minutes is None


@pytest.mark.slow
def test_torchrun_restarts_a_worker_that_exits_resumable(tmp_path: Path) -> None:
    """The documented exit code makes torchrun (max_restarts 1) start the worker again."""
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            from moe_dist.training.preemption import EXIT_RESUMABLE, StopDecision
            attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
            print("attempt", attempt, flush=True)
            if attempt == 0:
                stop = StopDecision.start()
                os.kill(os.getpid(), signal.SIGTERM)
                print(stop.stop_reason(1), flush=True)
                stop.close()
                sys.exit(EXIT_RESUMABLE)
            """
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd += ["--max-restarts=1", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert EXIT_RESUMABLE == 143
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "attempt 0" in done.stdout and "SIGTERM received, stopping after step 1" in done.stdout
    assert "attempt 1" in done.stdout
