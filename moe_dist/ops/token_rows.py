"""Token rows to slot rows and back, as two adjoint moves with gather-only backwards.

Shape legend: T tokens, K slots per token, S = T * K token-slots, X rows (one per kept slot, in
dispatch order), H row width.

``slots_X[i]`` is the slot (``t * K + k``) whose row is row i.

* ``gather_token_rows(x_TH, slots_X, K)``: row i is token ``slots_X[i] // K``'s row (the
  dispatch: a token appears once per slot it routes to).
* ``sum_slot_rows(y_XH, slots_X, T, K)``: each row placed at its slot, then every token's K slots
  summed (the combine; a slot without a row adds zero).

Each is the other's adjoint, so each one's backward is the other's forward. On GPUs that
replaces autograd's backward of the gather (``index_add_``: floating-point atomics, whose
summation order changes from run to run) with a placement and a sum over K in fixed order; the
placement is itself a gather by the inverse permutation when every slot has a row (the dropless
single-rank case). On CPU, where ``index_add_`` is sequential, the gather's backward stays
``index_add_``. Nothing is saved but the slot ids.

Where kernels are compiled (``moe_dist/ops/compiled.py``), the place-and-sum is one gather-and-sum
kernel that reads each row once and writes only ``[T, H]`` (eager, it writes and reads a
``[T * K, H]`` buffer in between).
"""

from __future__ import annotations

from typing import Any

import torch

from moe_dist.ops.compiled import FusedKernels, run_compiled, use_compiled


def _gather(x_TH: torch.Tensor, slots_X: torch.Tensor, K: int) -> torch.Tensor:
    return x_TH.index_select(0, torch.div(slots_X, K, rounding_mode="floor"))


def _gather_sum(y_XH: torch.Tensor, position_TK: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k y[position[t, k]]``, a position of -1 adding nothing (compiled: one
    kernel with indirect loads, no [T, K, H] buffer)."""
    rows_TKH = y_XH[position_TK.clamp(min=0)]
    return torch.where((position_TK >= 0).unsqueeze(-1), rows_TKH, 0).sum(1)


def _slot_positions(slots_X: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """``position_TK``: the row holding each slot, -1 where a slot has none. A fresh [T, K]
    tensor, not a view of a [T * K] one: a view's base size could equal X and make the compiler
    specialise on that."""
    position_TK = torch.full((T, K), -1, dtype=slots_X.dtype, device=slots_X.device)
    position_TK.view(-1).scatter_(0, slots_X, torch.arange(slots_X.numel(), device=slots_X.device))
    return position_TK


def _place_and_sum(y_XH: torch.Tensor, slots_X: torch.Tensor, T: int, K: int, compiled: bool) -> torch.Tensor:
    H, X = y_XH.shape[-1], slots_X.numel()
    if compiled and X > 0 and T >= 2:  # one gather-and-sum kernel
        out = run_compiled("gather_sum", _gather_sum, y_XH, _slot_positions(slots_X, T, K))
        if out is not None:
            return out
    if X == T * K:  # every slot has a row: a permutation, gathered by its inverse
        buf_SH = y_XH.index_select(0, _slot_positions(slots_X, T, K).view(-1))
    else:  # unique slots, so the copy is deterministic; missing slots stay zero
        buf_SH = y_XH.new_zeros(T * K, H).index_copy_(0, slots_X, y_XH)
    return buf_SH.view(T, K, H).sum(1)


def sum_into_tokens(
    g_XH: torch.Tensor, slots_X: torch.Tensor, T: int, K: int, fixed_order: bool, compiled: bool = False
) -> torch.Tensor:
    """``out[t] = sum of g_XH[i] with slots_X[i] // K == t``: place and sum in a fixed order, or
    ``index_add_`` (deterministic on CPU, and faster there: one pass, no [T * K, H] buffer;
    figures in docs/performance.md)."""
    if fixed_order:
        return _place_and_sum(g_XH, slots_X, T, K, compiled)
    tokens_X = torch.div(slots_X, K, rounding_mode="floor")
    return g_XH.new_zeros(T, g_XH.shape[-1]).index_add_(0, tokens_X, g_XH)


class _GatherTokenRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TH: torch.Tensor, slots_X: torch.Tensor, K: int, compiled: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(slots_X)
        ctx.T, ctx.K, ctx.compiled = x_TH.shape[0], K, compiled
        return _gather(x_TH, slots_X, K)

    @staticmethod
    def backward(ctx: Any, g_XH: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (slots_X,) = ctx.saved_tensors
        fixed_order = g_XH.device.type != "cpu"
        return sum_into_tokens(g_XH, slots_X, ctx.T, ctx.K, fixed_order, ctx.compiled), None, None, None


class _SumSlotRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, y_XH: torch.Tensor, slots_X: torch.Tensor, T: int, K: int, compiled: bool
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(slots_X)
        ctx.K = K
        return _place_and_sum(y_XH, slots_X, T, K, compiled)

    @staticmethod
    def backward(ctx: Any, g_TH: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        (slots_X,) = ctx.saved_tensors
        return _gather(g_TH, slots_X, ctx.K), None, None, None, None


def gather_token_rows(
    x_TH: torch.Tensor, slots_X: torch.Tensor, K: int, fused_kernels: FusedKernels = "auto"
) -> torch.Tensor:
    """``x_TH[slots_X // K]``, differentiable; the backward sums each token's slot gradients."""
    return _GatherTokenRows.apply(x_TH, slots_X, K, use_compiled(x_TH, fused_kernels))


def sum_slot_rows(
    y_XH: torch.Tensor, slots_X: torch.Tensor, T: int, K: int, fused_kernels: FusedKernels = "auto"
) -> torch.Tensor:
    """``y_TH[t] = sum of the rows i with slots_X[i] // K == t`` (``slots_X`` unique),
    differentiable; the backward gathers."""
    return _SumSlotRows.apply(y_XH, slots_X, T, K, use_compiled(y_XH, fused_kernels))
