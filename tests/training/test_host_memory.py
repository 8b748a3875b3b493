"""retain_freed_memory: a fresh process that allocates and frees the same large tensors every
step faults in new pages every step without it, and none once warm with it, at the same peak
resident size."""

from __future__ import annotations

import subprocess
import sys

_PROGRAM = """
import resource, sys, torch
from moe_dist.training.host_memory import retain_freed_memory
if sys.argv[1] == "on":
    assert retain_freed_memory() is None
sizes = [8 << 20, 4 << 20, 2 << 20, 8 << 20]  # floats: 32, 16, 8, 32 MB, freed after each step
def step():
    ts = [torch.empty(n).fill_(1.0) for n in sizes]
    del ts
for _ in range(30):  # glibc settles on a layout that fits the step within a few steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
usage = resource.getrusage(resource.RUSAGE_SELF)
print((usage.ru_minflt - before) / 10, usage.ru_maxrss)
"""


def _faults_per_step_and_peak_kib(mode: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True)
    faults, peak = out.stdout.split()
    return float(faults), int(peak)


def test_retaining_freed_memory_stops_page_faults_per_step() -> None:
    (off, off_peak), (on, on_peak) = _faults_per_step_and_peak_kib("off"), _faults_per_step_and_peak_kib("on")
    step_mib = (8 + 4 + 2 + 8) * 4
    touched_pages = step_mib * 2**20 // 4096  # pages written per step
    assert off > 0.3 * touched_pages  # glibc hands the biggest blocks back: re-faulted every step
    assert on == 0
    assert on_peak - off_peak < 4 * step_mib * 1024  # the pages kept: a few steps' worth at most
