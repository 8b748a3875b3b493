"""``run.profile``: a Chrome trace per rank holding every named range; the ranges are free when off."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from rank_processes import run_on_ranks
from train_helpers import tiny_config, train_body

from moe_dist.profile_ranges import RANGE_NAMES, named_range


@pytest.mark.slow
def test_profile_writes_a_trace_per_rank_with_every_named_range(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, "run.name=prof", "schedule.steps=4", "run.profile.start_step=2", "run.profile.steps=2"
    )
    run_on_ranks(train_body, 2, (cfg,))
    for rank in (0, 1):
        trace = json.loads((cfg.run_dir / "profile" / f"trace_rank{rank}.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        missing = [n for n in RANGE_NAMES if n not in names]
        assert not missing, f"rank {rank}: {missing}"
        # two optimizer steps profiled, each with its one range
        assert sum(e.get("name") == "optimizer" and e.get("ph") == "X" for e in trace["traceEvents"]) == 2


def test_named_range_is_a_no_op_off_and_a_range_on() -> None:
    off = named_range("router")
    assert off is named_range("dispatch")  # one shared no-op context
    n = 20000
    t0 = time.thread_time()  # CPU time: other jobs on a shared machine do not inflate it
    for _ in range(n):
        with named_range("router"):
            pass
    per_call = (time.thread_time() - t0) / n
    assert per_call < 2e-5, per_call  # ~0.2 us here; six ranges per layer per step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with named_range("experts"):
            torch.ones(4).sum()
    assert any(e.name == "experts" for e in prof.events())
