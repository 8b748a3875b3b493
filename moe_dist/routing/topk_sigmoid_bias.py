"""DeepSeek-V3 routing: sigmoid scores, auxiliary-loss-free balancing bias, group-limited top-k.

Shape legend: T tokens on this rank, H hidden size, E experts, K slots per token (top_k),
G expert groups (n_group), E/G experts per group.

Forward (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2; Loss-Free Balancing, arXiv 2408.15664):
1. logits_TE = x_TH @ W_EH^T in fp32; scores_TE = sigmoid(logits_TE).
2. choice_TE = scores_TE + expert_bias_E. The bias is used ONLY for selection.
3. Group-limited routing (when ``n_group > 1``): rank the G groups of each token by the sum of
   the top-2 biased scores inside the group, keep the ``topk_group`` best groups, mask the rest
   with -inf (the official inference code's choice; a 0 fill, as in some ports, can select a
   masked expert when biased scores are negative).
4. experts_TK = top-k of choice_TE.
5. weights_TK = the UNBIASED scores of the selected experts, divided by their sum when
   ``renormalize`` (``norm_topk_prob``), times ``routed_scaling_factor``.
6. probs_TE = scores_TE / sum_E scores_TE (DeepSeek-V3's s'), what the balancing losses see.

After each optimizer step ``after_step(global_counts_E)`` moves the bias toward balance without
any gradient: ``bias_i += rate * sign(mean_j c_j - c_i)`` (underloaded experts get more
attractive). ``global_counts_E`` is summed over the step's micro-batches and the whole data x
expert parallel group, so every replica applies the same update. ``bias_update_rate: 0`` freezes
the bias (DeepSeek-V3's final 500B tokens) and gives plain sigmoid routing.

``top_k: 1`` needs ``renormalize: false`` (a single renormalised weight is constant, so the task
loss would not reach the router); the config check says so.

The bias is a buffer: it is saved in checkpoints, receives no gradient, and the forward never
changes it (evaluation leaves it alone).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moe_dist.registry import ROUTERS
from moe_dist.routing.base import RouterConfig, Routing
from moe_dist.routing.linear_gate import LinearGateRouter


class TopKSigmoidBiasConfig(RouterConfig):
    name: Literal["topk_sigmoid_bias"] = "topk_sigmoid_bias"
    bias_update_rate: float = Field(
        0.001, ge=0.0, description="gamma / u: bias step per optimizer step (0 = frozen bias)"
    )
    renormalize: bool = Field(True, description="divide the top-k scores by their sum (norm_topk_prob)")
    routed_scaling_factor: float = Field(1.0, gt=0.0, description="multiplier of the routed weights")
    n_group: int = Field(1, ge=1, description="expert groups for group-limited routing (1 = off)")
    topk_group: int = Field(1, ge=1, description="groups each token may use")
    init: Literal["normal", "orthogonal"] = "normal"
    init_std: float = Field(0.02, gt=0.0)


def group_limited_mask(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Bool mask of experts in each token's ``topk_group`` best groups (top-2 sum per group)."""
    T, E = choice_TE.shape
    choice_TGe = choice_TE.view(T, n_group, E // n_group)
    top2 = min(2, E // n_group)
    group_scores_TG = choice_TGe.topk(top2, dim=-1).values.sum(dim=-1)
    group_idx = group_scores_TG.topk(topk_group, dim=-1).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_idx, True)
    return group_mask_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


@ROUTERS.register("topk_sigmoid_bias")
class TopKSigmoidBiasRouter(LinearGateRouter):
    Config = TopKSigmoidBiasConfig
    routing_batch = "token"  # a token's choice depends on that token (and the bias) only

    def __init__(self, cfg: TopKSigmoidBiasConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__(cfg, hidden_size, num_experts)
        self.cfg: TopKSigmoidBiasConfig = cfg
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.expert_bias_E.zero_()

    def forward(self, x_TH: torch.Tensor) -> Routing:
        logits_TE = self.gate_logits(x_TH)
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE.detach() + self.expert_bias_E
        if self.cfg.n_group > 1:
            keep_TE = group_limited_mask(choice_TE, self.cfg.n_group, self.cfg.topk_group)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        experts_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.cfg.renormalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.cfg.routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return Routing(
            experts_TK=experts_TK,
            weights_TK=weights_TK,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            every_slot_used=True,
        )

    @torch.no_grad()
    def after_step(self, global_counts_E: torch.Tensor) -> None:
        """``bias_i += rate * sign(mean(c) - c_i)``; a step with no tokens changes nothing (every
        sign is 0 then: no host read of the counts is needed to tell)."""
        counts_E = global_counts_E.to(self.expert_bias_E)
        if self.cfg.bias_update_rate == 0:
            return
        self.expert_bias_E.add_(self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E))

    @classmethod
    def validate_config(cls, cfg: RouterConfig, hidden_size: int, num_experts: int) -> list[str]:
        errors = super().validate_config(cfg, hidden_size, num_experts)
        assert isinstance(cfg, TopKSigmoidBiasConfig)
        if cfg.top_k == 1 and cfg.renormalize:
            errors.append(
                "renormalize: must be false when top_k is 1 (the weight would always be "
                "routed_scaling_factor and the router would get no gradient from the task loss)"
            )
        if cfg.n_group > 1 or cfg.topk_group > 1:
            if num_experts % cfg.n_group:
                errors.append(f"n_group: must divide num_experts ({num_experts}), got {cfg.n_group}")
                return errors
            if cfg.topk_group > cfg.n_group:
                errors.append(f"topk_group: must be <= n_group ({cfg.n_group}), got {cfg.topk_group}")
                return errors
            reachable = cfg.topk_group * (num_experts // cfg.n_group)
            if cfg.top_k > reachable:
                errors.append(
                    f"top_k: must be <= topk_group * num_experts / n_group ({reachable}) "
                    f"so that the kept groups hold enough experts, got {cfg.top_k}"
                )
        return errors
