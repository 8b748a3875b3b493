"""Where a step's time goes, from ``torch.profiler``: device busy time against the wall span, the
kernels that take it, and the host-side ops that keep the device waiting.

``profile_steps(run, steps)`` calls ``run`` ``steps`` times under the profiler and returns, per step:

- ``device_busy_s`` (the union of all kernel intervals) and ``span_s`` (first kernel start to last
  kernel end; the host wall time where no kernel ran); ``host_gap_fraction = 1 - busy / span``;
- ``top_kernels``: the kernels by total device time (name, ms per step, launches per step), and
  ``kernels_per_step``, the launch count;
- ``top_host_ops``: torch ops by their own (self) host time, ms per step and calls per step: what
  the host spends its time on between launches.

Used by ``bench_train.py --profile-steps`` and ``bench_layer_cuda.py --profile``. On CPU there are
no kernels: busy time is 0 and only the host ops are listed.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NAME_CHARS = 140  # CUTLASS kernel names run to thousands of characters


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6


def _top(totals: dict[str, list[float]], steps: int, top: int) -> list[dict[str, Any]]:
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [
        {"name": name[:NAME_CHARS], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
        for name, (us, n) in rows
    ]


def profile_steps(run: Callable[[], None], steps: int, top: int = 15) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        _sync()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                run()
            _sync()
        wall = time.perf_counter() - t0
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels: list[tuple[float, float]] = []
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            kernels.append((e["ts"], e["ts"] + e["dur"]))
            by_kernel[e.get("name", "?")][0] += e["dur"]
            by_kernel[e.get("name", "?")][1] += 1
    busy = _union_seconds(kernels)
    span = (max(b for _, b in kernels) - min(a for a, _ in kernels)) / 1e6 if kernels else wall
    span = max(span, busy)
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for avg in prof.key_averages():
        if avg.key.startswith("ProfilerStep") or avg.self_cpu_time_total <= 0:
            continue
        by_op[avg.key] = [avg.self_cpu_time_total, avg.count]
    return {
        "steps": steps,
        "device_busy_s_per_step": busy / steps,
        "span_s_per_step": span / steps,
        "host_gap_fraction": 1.0 - busy / span if span > 0 else 0.0,
        "kernels_per_step": len(kernels) / steps,
        "top_kernels": _top(by_kernel, steps, top),
        "top_host_ops": _top(by_op, steps, top),
    }


def print_profile(p: dict[str, Any], indent: str = "  ") -> None:
    busy, span = p["device_busy_s_per_step"] * 1e3, p["span_s_per_step"] * 1e3
    if not p["kernels_per_step"]:
        print(f"{indent}no device kernels (CPU): {span:.1f} ms of host time per step")
    else:
        print(
            f"{indent}device busy {busy:.1f} ms of a {span:.1f} ms span per step: host gaps "
            f"{p['host_gap_fraction']:.0%}; {p['kernels_per_step']:.0f} kernels per step"
        )
    for title, key in (("kernels by device time", "top_kernels"), ("host ops by self time", "top_host_ops")):
        if p[key]:
            print(f"{indent}{title} (ms/step, calls/step):")
        for r in p[key]:
            print(f"{indent}  {r['ms_per_step']:8.2f} {r['calls_per_step']:7.1f}  {r['name'][:100]}")
