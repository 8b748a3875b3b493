"""The dtype a custom op computes in, and weights cast to it once per optimizer step.

Autocast covers ``nn.Linear``, ``matmul`` and attention, but not ``grouped_mm``, our own
autograd functions or a ``w.to(...)`` copy: under ``torch.autocast`` the residual stream and the
master weights stay fp32, so an expert GEMM would run in fp32 (8x slower than bf16 at
Mixtral-like shapes on an H200, measured). Every custom op therefore asks ``compute_dtype`` and
casts its operands itself.

``cast_weight(w, dtype)`` is that cast for a parameter, made once per optimizer update instead
of once per call: the cast copy is kept beside the parameter and reused by every micro-batch,
layer call and activation recompute until the weight changes. A change is seen by the
parameter's version counter and storage (an in-place op, ``copy_`` of a checkpoint load) or by
any torch optimizer's step (a global step post-hook bumps a generation count: fused AdamW
updates the weights in place WITHOUT bumping their version counters, measured on torch 2.13).
Its backward hands the gradient back in the parameter's dtype, so gradients accumulate in fp32
across micro-batches. The copy costs ``numel * 2`` bytes of memory per bf16 weight between steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_GENERATION = [0]  # bumped after every optimizer step


def _weights_updated(*_: Any) -> None:
    _GENERATION[0] += 1


register_optimizer_step_post_hook(_weights_updated)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype of ``x``'s device when autocast is on there, else ``x.dtype``."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _CastOnce(torch.autograd.Function):
    """Forward: the cached copy (a view of it, so each call is its own graph node). Backward:
    the gradient in the parameter's dtype."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.dtype = w.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g.to(ctx.dtype), None


def cast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` in ``dtype``, differentiable, cast at most once per version of ``w``."""
    if w.dtype == dtype:
        return w
    cached = getattr(w, "_moe_cast", None)
    key = (w._version, w.data_ptr(), dtype, _GENERATION[0])
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, w.detach().to(dtype))
        w._moe_cast = cached  # type: ignore[attr-defined]
    if not (w.requires_grad and torch.is_grad_enabled()):
        return cached[1]
    return _CastOnce.apply(w, cached[1])
