"""Named ranges for profiler traces (router, dispatch, all_to_all, experts, combine, optimizer).

``with named_range("dispatch"): ...`` opens a ``torch.profiler.record_function`` range only while
a profiler is recording (``run.profile``, ``training/profiling.py``, or the user's own
``torch.profiler.profile``); otherwise it is one C call (~60 ns) and a shared no-op context, so
the layers carry the ranges at no measurable cost. A leaf module (torch only), so that layers,
parallel and training all import it without cycles.
"""

from __future__ import annotations

import contextlib

from torch.autograd import _profiler_enabled
from torch.autograd.profiler import record_function

# The ranges the layers and the engine open, in the order of one training step.
RANGE_NAMES: tuple[str, ...] = ("router", "dispatch", "all_to_all", "experts", "combine", "optimizer")

_OFF = contextlib.nullcontext()  # reusable: enters and exits any number of times


def named_range(name: str) -> contextlib.AbstractContextManager:
    """A ``record_function(name)`` range while a profiler records, else a no-op context."""
    return record_function(name) if _profiler_enabled() else _OFF
