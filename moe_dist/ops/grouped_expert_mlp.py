"""The routed experts' MLP over grouped GEMMs, with ``expert_mlp``'s hand-written backward.

Shape legend: X rows (expert-major), H hidden size, F ffn hidden size, G = 2F (SwiGLU, gate | up)
or F (GELU), e local experts.

Same maths and same saved tensors as ``expert_mlp`` (x, the fused pre-activation h = [h1 | h3]
and the routing weights: the GEMMs' own inputs, nothing derived from them), but every GEMM is one
``torch.nn.functional.grouped_mm`` over all experts, and the group sizes stay on the device as
offsets (no host synchronisation). The backward's grouped GEMMs use the operand layouts autograd
itself uses for ``grouped_mm`` (a transposed weight view for the input gradient, transposed
2-D operands with the offsets along the reduction dimension for the weight gradients).

Whether this runs correctly on a (device, dtype) is probed once with a forward and backward
against the per-expert loop, uneven and empty groups included (``grouped_experts_work``):
grouped_mm's kernels have layout and alignment rules that differ by GPU generation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from moe_dist.ops.compiled import FusedKernels, use_compiled
from moe_dist.ops.expert_mlp import check_expert_inputs, expert_mlp, is_swiglu
from moe_dist.ops.fused_activation import activation_backward, scaled_activation

# Which expert path a layer takes: this file's, ``expert_mlp``'s loop, or by device.
ExpertsBackend = Literal["auto", "grouped_mm", "loop"]


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs_e)


class _GroupedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_XH: torch.Tensor,
        w13_eHG: torch.Tensor,
        w2_eFH: torch.Tensor,
        scale_X: torch.Tensor | None,
        tokens_per_expert_e: torch.Tensor,
        compiled: bool,
    ) -> torch.Tensor:
        x_XH = x_XH.contiguous()
        offs_e = torch.cumsum(tokens_per_expert_e, 0).to(
            device=x_XH.device, dtype=torch.int32, non_blocking=True
        )
        swiglu = is_swiglu(w13_eHG, w2_eFH)
        h_XG = _grouped_mm(x_XH, w13_eHG, offs_e)  # [h1 | h3] in one GEMM
        a_XF = scaled_activation(h_XG, scale_X, swiglu, compiled)
        y_XH = _grouped_mm(a_XF, w2_eFH, offs_e)
        ctx.save_for_backward(x_XH, w13_eHG, w2_eFH, scale_X, offs_e, h_XG)
        ctx.compiled, ctx.swiglu = compiled, swiglu
        return y_XH

    @staticmethod
    def backward(ctx: Any, dy_XH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_XH, w13_eHG, w2_eFH, scale_X, offs_e, h_XG = ctx.saved_tensors
        dy_XH = dy_XH.contiguous()
        du_XF = _grouped_mm(dy_XH, w2_eFH.transpose(-2, -1), offs_e)
        a_XF, dh_XG, ds_X = activation_backward(du_XF, h_XG, scale_X, ctx.swiglu, ctx.compiled)
        dw2_eFH = _grouped_mm(a_XF.t(), dy_XH, offs_e)
        del a_XF
        dw13_eHG = _grouped_mm(x_XH.t(), dh_XG, offs_e)
        # one GEMM for the input gradient: the fused weight takes [dh1 | dh3] at once, no add
        dx_XH = _grouped_mm(dh_XG, w13_eHG.transpose(-2, -1), offs_e) if ctx.needs_input_grad[0] else None
        if ds_X is not None and scale_X is not None:
            ds_X = ds_X.to(scale_X.dtype)
        return dx_XH, dw13_eHG, dw2_eFH, ds_X, None, None


def grouped_expert_mlp(
    x_XH: torch.Tensor,
    w13_eHG: torch.Tensor,
    w2_eFH: torch.Tensor,
    tokens_per_expert_e: torch.Tensor,
    scale_X: torch.Tensor | None = None,
    fused_kernels: FusedKernels = "auto",
) -> torch.Tensor:
    """``expert_mlp`` with grouped GEMMs; ``tokens_per_expert_e`` may live on the device (it is
    not read on the host, so rows and counts are not checked against each other here)."""
    check_expert_inputs("grouped_expert_mlp", x_XH, w13_eHG, w2_eFH, scale_X, None)
    compiled = use_compiled(x_XH, fused_kernels)
    return _GroupedExpertMLP.apply(x_XH, w13_eHG, w2_eFH, scale_X, tokens_per_expert_e, compiled)


_WORKS: dict[tuple[str, torch.dtype], bool] = {}
PROBE_COUNTS = (5, 0, 19, 8)  # uneven (not multiples of 8) and an empty group
PROBE_H, PROBE_F = 16, 32


def grouped_experts_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``grouped_expert_mlp`` runs here and matches the per-expert loop, forward and
    backward; probed once per (device, dtype)."""
    key = (str(device), dtype)
    if key not in _WORKS:
        # The caller may be in no_grad (evaluation), under autocast, or packing saved tensors
        # (offloading hooks): the probe sees none of that.
        isolated = (
            torch.enable_grad(),
            torch.autocast(device.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        )
        try:
            with isolated[0], isolated[1], isolated[2]:
                _WORKS[key] = _probe(device, dtype)
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _WORKS[key] = False
    return _WORKS[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    e, X = len(PROBE_COUNTS), sum(PROBE_COUNTS)
    leaves = [
        torch.randn(X, PROBE_H, generator=g),
        torch.randn(e, PROBE_H, 2 * PROBE_F, generator=g) * 0.25,
        torch.randn(e, PROBE_F, PROBE_H, generator=g) * 0.25,
        torch.rand(X, generator=g),
    ]
    dy = torch.randn(X, PROBE_H, generator=g)
    want = [t.clone().requires_grad_() for t in leaves]
    y_want = expert_mlp(*want[:3], list(PROBE_COUNTS), "torch", scale_X=want[3], fused_kernels="eager")
    y_want.backward(dy)
    got = [t.to(device=device, dtype=dtype).requires_grad_() for t in leaves]
    counts_e = torch.tensor(PROBE_COUNTS, device=device)
    y_got = grouped_expert_mlp(*got[:3], counts_e, scale_X=got[3], fused_kernels="eager")
    y_got.backward(dy.to(device=device, dtype=dtype))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    pairs = [(y_got, y_want)] + [(a.grad, b.grad) for a, b in zip(got, want)]
    return all(
        a is not None and b is not None and _close(a.detach().float().cpu(), b.detach(), tol)
        for a, b in pairs
    )


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= tol * (
        1.0 + float(want.abs().max())
    )
