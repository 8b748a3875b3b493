"""`LinearGateRouter`: the base of routers whose gate is one linear map ``weight`` [E, H].

Shape legend: T tokens, H hidden size, E experts.

What the top-k softmax, top-k sigmoid-with-bias and expert-choice routers share:
1. ``weight`` [E, H], fp32 whatever the model's dtype, initialised by ``reset_parameters``
   from the config's ``init`` ("normal" with ``init_std``, or "orthogonal").
2. ``weight_EH`` exposes it (SimBal regularises it).
3. ``gate_logits(x_TH)`` = x_TH @ weight^T in fp32 even inside a bf16 autocast region: routing
   decisions are sensitive to rounding (fp64 operands stay fp64: the float64 reference and
   finite-difference tests, ``tests/balancing/test_invariance.py``). It keeps ``x_TH`` for the
   backward in its own dtype and casts again there (autograd would keep the fp32 copy: at bf16
   that is 2x the input, ~14 % of the experts' activations at Qwen3-like shapes).

Subclasses register their own buffers after ``super().__init__`` and then call
``self.reset_parameters()`` (extending it for their buffers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.routing.base import Router, RouterConfig


class LinearGateRouter(Router):
    """A router with an fp32 linear gate (see the module docstring); ``cfg`` has ``init``, ``init_std``."""

    def __init__(self, cfg: RouterConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__(cfg, hidden_size, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))

    def reset_parameters(self) -> None:
        if self.cfg.init == "orthogonal":  # type: ignore[attr-defined]
            nn.init.orthogonal_(self.weight)
        else:
            nn.init.normal_(self.weight, std=self.cfg.init_std)  # type: ignore[attr-defined]

    @property
    def weight_EH(self) -> torch.Tensor:  # noqa: N802 - contract name (shape suffix)
        return self.weight

    def gate_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """logits_TE = x_TH @ weight^T, in fp32 (fp64 when an operand is fp64)."""
        with torch.autocast(x_TH.device.type, enabled=False):
            return _Fp32Linear.apply(x_TH, self.weight)


def _wide(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an operand is fp64."""
    return torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)


class _Fp32Linear(torch.autograd.Function):
    """``x.float() @ w.float()^T`` (fp64 kept), keeping ``x`` and ``w`` as they are for the backward."""

    @staticmethod
    def forward(ctx: Any, x_TH: torch.Tensor, w_EH: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_TH, w_EH)
        dt = _wide(x_TH, w_EH)
        return F.linear(x_TH.to(dt), w_EH.to(dt))

    @staticmethod
    def backward(ctx: Any, g_TE: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x_TH, w_EH = ctx.saved_tensors
        dt = _wide(x_TH, w_EH)
        g_TE = g_TE.to(dt)
        dx = (g_TE @ w_EH.to(dt)).to(x_TH.dtype) if ctx.needs_input_grad[0] else None
        dw = (g_TE.t() @ x_TH.to(dt)).to(w_EH.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw
