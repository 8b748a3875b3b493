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

Loss-free bias on a softmax gate (``bias_update_rate`` > 0; 0, the default, is the plain router
above, with no bias buffer). Loss-Free Balancing (Wang et al., arXiv 2408.15664, Eq. 3) writes the
gate generically, s = G(logits) with G sigmoid or softmax, and selects the top-k of ``s + b``
while weighting by the unbiased ``s``; the SimBal paper's App. A.1 trains it on a softmax gate
("softmax LF", gamma 0.001, also with SimBal: "LF+SimBal"). Here:

3'. experts_TK = top-k of ``probs_TE.detach() + expert_bias_E`` (the bias only selects);
4'. weights_TK = the unbiased probs_TE of the selected experts (renormalised when asked).

After each optimizer step ``after_step`` moves the bias as ``topk_sigmoid_bias`` does:
``bias_i += rate * sign(mean_j c_j - c_i)`` on the step's global counts. Differences from
``topk_sigmoid_bias``: the bias is added to softmax probabilities (which sum to 1, so a step of
0.001 is larger relative to them than to sigmoid scores near 0.5), and the balancing losses see
the softmax probabilities. Where exactly the SimBal paper adds the bias on its softmax gate is
not stated; probabilities follow Wang et al.'s Eq. 3.

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
    bias_update_rate: float = Field(
        0.0, ge=0.0, description="loss-free bias step per optimizer step on the softmax gate (0 = no bias)"
    )


@ROUTERS.register("topk_softmax")
class TopKSoftmaxRouter(LinearGateRouter):
    Config = TopKSoftmaxConfig
    routing_batch = "token"  # a token's choice depends on that token (and the bias) only

    def __init__(self, cfg: TopKSoftmaxConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__(cfg, hidden_size, num_experts)
        self.cfg: TopKSoftmaxConfig = cfg
        if cfg.bias_update_rate > 0:  # only then: checkpoints of the plain router keep their keys
            self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.cfg.bias_update_rate > 0:
            self.expert_bias_E.zero_()

    def forward(self, x_TH: torch.Tensor) -> Routing:
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TH = x_TH * torch.empty_like(x_TH).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self.gate_logits(x_TH)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.cfg.bias_update_rate > 0:
            experts_TK = (probs_TE.detach() + self.expert_bias_E).topk(self.top_k, dim=-1).indices
            p_TK = probs_TE.gather(1, experts_TK)
        else:
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

    @torch.no_grad()
    def after_step(self, global_counts_E: torch.Tensor) -> None:
        """Loss-free bias: ``bias_i += rate * sign(mean(c) - c_i)``; nothing without a bias or tokens."""
        if self.cfg.bias_update_rate == 0:
            return
        counts_E = global_counts_E.to(self.expert_bias_E)
        if counts_E.sum() == 0:
            return
        self.expert_bias_E.add_(self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E))

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
