"""Switch / GShard load-balancing loss over the micro-batch: ``E * sum_i f_i P_i``.

- f_i: fraction of this rank's token-slot assignments that went to expert i,
  ``counts_i / (K * T)``. With that normalisation the minimum (uniform routing) is 1 for any
  top-k. (OLMoE and SimBal's code normalise by T instead, which scales the loss by K; set
  ``normalize_by_topk: false`` for that.)
- P_i: mean router probability of expert i over the T tokens (gradient flows through P only).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moe_dist.balancing.base import BalancingLoss, Load, LossConfig
from moe_dist.registry import LOSSES
from moe_dist.routing.base import Router, Routing


class SwitchLossConfig(LossConfig):
    name: Literal["switch"] = "switch"
    normalize_by_topk: bool = Field(True, description="f_i = counts / (K*T) (min 1) instead of counts / T (min K)")


def switch_loss(f_E: torch.Tensor, probs_TE: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` with P the mean of ``probs_TE`` over tokens."""
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * torch.sum(f_E.detach() * P_E)


@LOSSES.register("switch")
class SwitchLoss(BalancingLoss):
    Config = SwitchLossConfig

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        denom = load.num_tokens * (self.top_k if self.cfg.normalize_by_topk else 1)
        f_E = load.counts_E / max(denom, 1)
        return switch_loss(f_E, routing.probs_TE, self.num_experts)
