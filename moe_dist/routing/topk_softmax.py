"""Softmax-then-top-k routing (Switch, GShard, Mixtral, Qwen3-MoE, OLMoE, SimBal's base router).

Forward:
1. logits_TE = x_TH @ W_EH^T (fp32, whatever the activations' dtype: routing decisions are
   sensitive to rounding).
2. probs_TE = softmax(logits_TE) over all E experts; the balancing losses see these.
3. experts_TK, p_TK = top-k of probs_TE.
4. weights_TK = p_TK, renormalised to sum 1 over the k slots when ``renormalize`` (Mixtral,
   Qwen3 ``norm_topk_prob``); raw probabilities otherwise (Switch, k=1).

Options: multiplicative input jitter in training (Switch Transformer: x * U(1-eps, 1+eps)) and
orthogonal weight init (SimBal's recommendation; needs H >= E for orthonormal rows, otherwise
torch gives orthonormal columns).

``top_k: 1`` with ``renormalize: true`` is rejected: the single weight would always be 1 and the
task loss would give the router no gradient (Switch keeps the raw probability; Megatron-Core
likewise demands ``moe_router_pre_softmax`` for top-1).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moe_dist.registry import ROUTERS
from moe_dist.routing.base import RouterConfig, Routing
from moe_dist.routing.linear_gate import LinearGateRouter


class TopKSoftmaxConfig(RouterConfig):
    name: Literal["topk_softmax"] = "topk_softmax"
    renormalize: bool = Field(True, description="renormalise the top-k weights to sum to 1")
    jitter_eps: float = Field(
        0.0, ge=0.0, lt=1.0, description="Switch multiplicative input jitter (training)"
    )
    init: Literal["normal", "orthogonal"] = "normal"
    init_std: float = Field(0.02, gt=0.0, description="std of the normal init")


@ROUTERS.register("topk_softmax")
class TopKSoftmaxRouter(LinearGateRouter):
    Config = TopKSoftmaxConfig

    def __init__(self, cfg: TopKSoftmaxConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__(cfg, hidden_size, num_experts)
        self.cfg: TopKSoftmaxConfig = cfg
        self.reset_parameters()

    def forward(self, x_TH: torch.Tensor) -> Routing:
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TH = x_TH * torch.empty_like(x_TH).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self.gate_logits(x_TH)
        probs_TE = logits_TE.softmax(dim=-1)
        p_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.cfg.renormalize:
            p_TK = p_TK / p_TK.sum(dim=-1, keepdim=True)
        return Routing(
            experts_TK=experts_TK,
            weights_TK=p_TK,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            every_slot_used=True,
        )

    @classmethod
    def validate_config(cls, cfg: RouterConfig, hidden_size: int, num_experts: int) -> list[str]:
        errors = super().validate_config(cfg, hidden_size, num_experts)
        assert isinstance(cfg, TopKSoftmaxConfig)
        if cfg.top_k == 1 and cfg.renormalize:
            errors.append(
                "renormalize: must be false when top_k is 1 (the weight would always be 1 and the router "
                "would get no gradient from the task loss; Switch uses the raw probability)"
            )
        return errors
