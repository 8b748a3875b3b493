"""ST-MoE router z-loss (Zoph et al. 2022, arXiv 2202.08906, Eq. 5).

Shape legend: T tokens on this rank, E experts.

L_z = (1/T) sum_t (logsumexp_i logits_ti)^2. It keeps router logits small, which keeps the
softmax out of its saturated, round-off-prone regime. ST-MoE uses coefficient 1e-3; OLMo 2 /
SimBal runs use 1e-5. Needs ``routing.logits_TE``: routers without logits are rejected at
config time.

Semantics (``semantics``, ``balancing/semantics.py``): ``token``, a mean over tokens of a function
of each token's logits (not of the experts chosen), so the objective is the mean over the step's
tokens whatever the layout and router.
"""

from __future__ import annotations

from typing import Literal

import torch

from moe_dist.balancing.base import BalancingLoss, Load, LossConfig
from moe_dist.balancing.semantics import LossSemantics
from moe_dist.registry import LOSSES
from moe_dist.routing.base import Router, Routing


class ZLossConfig(LossConfig):
    name: Literal["z_loss"] = "z_loss"


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


@LOSSES.register("z_loss")
class ZLoss(BalancingLoss):
    Config = ZLossConfig
    semantics = LossSemantics("token", uses_routing=False)

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        if routing.logits_TE is None:
            raise ValueError(f"z_loss: router {type(router).registry_name!r} returned no logits_TE")
        return z_loss(routing.logits_TE)

    @classmethod
    def validate_config(cls, cfg: LossConfig, router_cls: type[Router], num_experts: int) -> list[str]:
        if not getattr(router_cls, "has_logits", True):
            return [
                f"name: z_loss needs router logits (logits_TE); router {router_cls.registry_name!r} has none "
                f"(its scores are not logits)"
            ]
        return []
