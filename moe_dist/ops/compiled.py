"""Memory-bound kernels compiled with ``torch.compile``, with an eager fallback.

The MoE layer's elementwise and row-moving work (the experts' activation and its backward,
``fused_activation.py``; the combine's gather-and-sum, ``parallel/token_rows.py``) reads and
writes whole ``[rows, F]`` or ``[rows, H]`` tensors several times when run as eager torch ops.
Compiled, each becomes one kernel that reads its inputs once. On a GPU these passes are memory
bound and a large share of a fine-grained expert layer; on CPU compiling costs ~19 s per process
and bought nothing measurable (``docs/performance.md``).

``model.moe.fused_kernels``: ``auto`` compiles on CUDA only, ``compiled`` everywhere, ``eager``
never. A kernel compiles at its first call; if compiling or running it fails, one warning names
why and the eager version runs for the rest of the process (``compile_failures()`` lists those;
the benchmark records them).

Shapes: the row count (dim 0 of every input) is symbolic, so one compile serves every routing;
every other size is a constant of the kernel (``dynamic=False`` plus ``maybe_mark_dynamic`` on dim
0). Under ``dynamic=True`` the widths (F, H) were symbolic too: every element's index is then a
runtime division and the loads cannot be proven aligned for vector access. With it, the compiled
SwiGLU forward ran at about 40% of its memory bound on an H200 and the backward at about 20%
(``docs/performance.md``); static widths are the expected cure, not yet measured on a GPU. A model
with two widths (routed and shared experts) compiles once per width.

No recompiles in steady state: a compiled function guards on the global grad mode, the
autocast state and each input's ``requires_grad``. The kernels run inside autograd functions,
so ``run_compiled`` always calls them the same way: under ``no_grad``, with autocast off (the
inputs are already in the compute dtype) and with detached inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch

FusedKernels = Literal["auto", "compiled", "eager"]
log = logging.getLogger(__name__)

_compiled: dict[str, Callable[..., Any]] = {}
_failed: dict[str, str] = {}  # kernel name -> why it fell back to eager


def use_compiled(x: torch.Tensor, mode: FusedKernels) -> bool:
    """Whether kernels for tensors like ``x`` are compiled under ``mode``."""
    return mode == "compiled" or (mode == "auto" and x.device.type == "cuda")


def compile_failures() -> dict[str, str]:
    """Kernels that fell back to eager in this process, with the reason."""
    return dict(_failed)


def run_compiled(name: str, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
    """``torch.compile(fn)(*args)``, compiled once per ``name``; None where that cannot be had
    (the caller then runs its eager version)."""
    if name in _failed:
        return None
    compiled = _compiled.get(name)
    if compiled is None:
        compiled = _compiled[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    inputs = [a.detach() for a in args]
    for t in inputs:  # rows symbolic, widths constant (module docstring)
        torch._dynamo.maybe_mark_dynamic(t, 0)
    try:
        with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            return compiled(*inputs)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: warn once, run eager
        _failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("compiling %s failed (%s); using the eager kernels", name, _failed[name])
        return None
