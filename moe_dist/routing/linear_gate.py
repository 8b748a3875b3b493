"""`LinearGateRouter`: the base of routers whose gate is one linear map ``weight`` [E, H].

Shape legend: T tokens, H hidden size, E experts.

What the top-k softmax, top-k sigmoid-with-bias and expert-choice routers share:
1. ``weight`` [E, H], fp32 whatever the model's dtype, initialised by ``reset_parameters``
   from the config's ``init`` ("normal" with ``init_std``, or "orthogonal").
2. ``weight_EH`` exposes it (SimBal regularises it).
3. ``gate_logits(x_TH)`` = x_TH @ weight^T in fp32 even inside a bf16 autocast region: routing
   decisions are sensitive to rounding.

Subclasses register their own buffers after ``super().__init__`` and then call
``self.reset_parameters()`` (extending it for their buffers).
"""

from __future__ import annotations

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
        """logits_TE = x_TH @ weight^T, in fp32."""
        with torch.autocast(x_TH.device.type, enabled=False):
            return F.linear(x_TH.float(), self.weight.float())
