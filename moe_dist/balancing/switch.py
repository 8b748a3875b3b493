"""Switch / GShard load-balancing loss over the micro-batch: ``E * sum_i f_i P_i``.

Shape legend: T tokens on this rank, E experts, K slots per token.

- f_i: fraction of this rank's token-slot assignments that went to expert i,
  ``counts_i / (K * T)``. With that normalisation the minimum (uniform routing) is 1 for any
  top-k (Switch's k = 1 formula, Fedus et al. 2021). OLMoE and SimBal's code normalise by T
  instead, which scales the loss by K; set ``normalize_by_topk: false`` for that.
- P_i: mean router probability of expert i over the T tokens. f carries no gradient (counts are
  a step function), so the gradient flows through P only.

The loss is computed per rank on its own micro-batch; data-parallel gradient averaging then
averages it over ranks ("micro-batch" balancing in Qiu et al. 2025). ``global_batch`` uses the
group-wide f instead.
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
    normalize_by_topk: bool = Field(
        True, description="f_i = counts / (K*T) (min 1) instead of counts / T (min K)"
    )


def switch_loss(f_E: torch.Tensor, probs_TE: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` with P the mean of ``probs_TE`` over tokens (fp32 or wider)."""
    P_E = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32)).mean(dim=0)
    return num_experts * torch.sum(f_E.detach().to(P_E.dtype) * P_E)


@LOSSES.register("switch")
class SwitchLoss(BalancingLoss):
    Config = SwitchLossConfig

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        denom = load.num_tokens * (self.top_k if self.cfg.normalize_by_topk else 1)
        f_E = load.counts_E / max(denom, 1)
        return switch_loss(f_E, routing.probs_TE, self.num_experts)

    @classmethod
    def validate_config(cls, cfg: LossConfig, router_cls: type[Router], num_experts: int) -> list[str]:
        if getattr(router_cls, "balanced_by_construction", False):
            return [
                f"name: switch is constant with router {router_cls.registry_name!r} (every expert takes the "
                f"same number of tokens, so f_i is uniform and the loss has no gradient); remove it"
            ]
        return []
