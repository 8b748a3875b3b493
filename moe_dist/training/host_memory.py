"""Keep freed host memory mapped, so a CPU training step reuses pages instead of faulting in new ones.

Why: glibc serves large allocations (the [rows, F] activations of an MoE layer are tens of MB)
with ``mmap`` and returns them to the kernel on ``free``, and trims the heap top the same way. The
next step's tensors then start on fresh pages, and every 4 KiB page of them costs a fault on
first touch, a cost that grows with the activations (figures for the layer of
``tools/bench_layer_cpu.py`` in docs/performance.md). ``mallopt(M_MMAP_MAX, 0)`` serves every
allocation from the heap and ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`` keeps up to 2 GiB of free
heap top, so from the second step on, tensors land on pages that are already mapped. The cost:
the resident size stays at the peak of a step, which a training process reaches every step
anyway.

Affects only the calling process and only glibc; elsewhere ``retain_freed_memory`` says why it
did nothing. CUDA memory has its own caching allocator and is unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_MAX = 2**31 - 1  # mallopt takes an int


def retain_freed_memory() -> str | None:
    """Switch glibc's allocator to keep freed memory; None when done, else why not."""
    name = ctypes.util.find_library("c")
    if name is None:
        return "no C library found"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return f"{name} has no mallopt (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_MAX)):
        return f"{name}: mallopt refused the settings"
    return None
