"""fp32 matrix products on CPU through oneDNN where it is available and exact, else ``torch.mm``.

Why: torch's fp32 CPU ``mm`` calls MKL's sgemm, and MKL takes its AVX2 code path on non-Intel
CPUs. oneDNN, which ships inside every x86 torch wheel, picks AVX-512 where the CPU has it, and is
then the faster of the two (``tools/bench_layer_cpu.py`` measures both as its ceiling; figures in
docs/performance.md).

oneDNN is reached through ``torch.ops.mkldnn._linear_pointwise`` (the op torch's own compiler
emits for CPU linears): dense strided tensors in and out, no layout conversion. The op is
private, so it is probed once per process: it must exist and agree with a float64 product as
closely as ``torch.mm`` does (a reduced-precision path would be ~1000x further off). If the
probe fails, ``matmul`` is ``torch.mm``; ``onednn_status()`` says why.
"""

from __future__ import annotations

from typing import Literal

import torch

CpuMatmul = Literal["onednn", "torch"]

_PROBE: dict[str, str | None] = {}  # "result": None when usable, else the reason


def _linear_op():  # noqa: ANN202 - a torch op overload packet
    return torch.ops.mkldnn._linear_pointwise


def _probe() -> str | None:
    """None when oneDNN's fp32 linear is usable here, else why not (once per process)."""
    if "result" in _PROBE:
        return _PROBE["result"]
    reason: str | None = None
    try:
        if not torch.backends.mkldnn.is_available():
            reason = "torch was built without oneDNN (mkldnn)"
        else:
            g = torch.Generator().manual_seed(0)
            a_MK = torch.randn(96, 64, generator=g)
            b_KN = torch.randn(64, 80, generator=g)
            want = a_MK.double() @ b_KN.double()
            mm_err = (torch.mm(a_MK, b_KN).double() - want).abs().max().item()
            # Plain, transposed-input and transposed-weight operands: the three forms the
            # experts' forward and backward use.
            for a, b in ((a_MK, b_KN), (a_MK.t().contiguous().t(), b_KN), (a_MK, b_KN.t().contiguous().t())):
                got = _linear_op()(a, b.t(), None, "none", [], "")
                err = (got.double() - want).abs().max().item()
                if got.shape != want.shape or not err <= 8 * mm_err + 1e-6:
                    reason = f"oneDNN fp32 linear is off by {err:.2e} (torch.mm: {mm_err:.2e})"
                    break
    except (AttributeError, RuntimeError, NotImplementedError, TypeError) as exc:
        reason = f"oneDNN fp32 linear is not callable: {type(exc).__name__}: {exc}"
    _PROBE["result"] = reason
    return reason


def onednn_status() -> str | None:
    """None when ``matmul(..., "onednn")`` really uses oneDNN for fp32 CPU tensors, else why not."""
    return _probe()


def uses_onednn(x: torch.Tensor, choice: CpuMatmul) -> bool:
    """Whether ``matmul`` takes oneDNN for tensors like ``x`` under ``choice``."""
    return choice == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32 and _probe() is None


def matmul(a_MK: torch.Tensor, b_KN: torch.Tensor, onednn: bool) -> torch.Tensor:
    """``a_MK @ b_KN`` (no autograd); oneDNN when ``onednn`` (see ``uses_onednn``). Either operand
    may be a transposed view: both kernels read strides, so no copy is made here."""
    if onednn:
        return _linear_op()(a_MK, b_KN.t(), None, "none", [], "")
    return torch.mm(a_MK, b_KN)
