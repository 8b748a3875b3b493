"""Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368): experts pick tokens.

Shape legend: T tokens on this rank, H hidden size, E experts, C capacity (tokens per expert).

Forward:
1. logits_TE = x_TH @ W_EH^T (fp32); probs_TE = softmax over the E experts (the paper's S).
2. C = ceil(T * capacity_factor / E), at most T: every expert takes exactly C tokens.
3. Each expert e takes its top-C tokens of column probs_TE[:, e] (top-k over TOKENS, S^T).
4. The Routing has K = E slots per token: ``experts_TK[t, e] = e`` when expert e took token t,
   else -1; ``weights_TK[t, e] = probs_TE[t, e]`` when taken, else 0 (no renormalisation,
   as in the paper's gating G). A token may get 0..E experts; a token no expert took passes
   through the layer with a zero routed output (the residual carries it).

Load is perfectly balanced by construction (every expert gets exactly C of this rank's tokens),
so batch-level balancing losses (switch, global_batch) would have zero gradient and are
rejected at config time; ``top_k`` is ignored (C tokens per expert replace it).

Causality caveat: a token's experts depend on the OTHER tokens of the micro-batch on this rank,
including later tokens of its own sequence. Training therefore leaks a little information from
the future into the routing of a decoder-only model, and at inference the output for a token
changes with how requests are batched (a single token batch routes differently from the same
token inside a full batch). Zhou et al. note the same limitation for auto-regressive decoding.
For the same reason a balancing loss of the choices (``seq_aux``) is a micro-batch statistic here
(``routing_batch = "micro_batch"``, ``balancing/semantics.py``).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from moe_dist.registry import ROUTERS
from moe_dist.routing.base import RouterConfig, Routing
from moe_dist.routing.linear_gate import LinearGateRouter


class ExpertChoiceConfig(RouterConfig):
    name: Literal["expert_choice"] = "expert_choice"
    capacity_factor: float = Field(2.0, gt=0.0, description="c: each expert takes ceil(T * c / E) tokens")
    init: Literal["normal", "orthogonal"] = "normal"
    init_std: float = Field(0.02, gt=0.0)


def expert_capacity(num_tokens: int, capacity_factor: float, num_experts: int) -> int:
    """Tokens per expert, ``ceil(T * c / E)``, clamped to [0, T]."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(LinearGateRouter):
    Config = ExpertChoiceConfig
    # Every expert gets exactly C tokens, so batch-level f_i is uniform and a Switch-style loss
    # has zero gradient; the switch / global_batch config checks reject the pair.
    balanced_by_construction: ClassVar[bool] = True
    # Experts pick among the rank's micro-batch: losses of the choices are micro-batch statistics.
    routing_batch = "micro_batch"

    def __init__(self, cfg: ExpertChoiceConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__(cfg, hidden_size, num_experts)
        self.cfg: ExpertChoiceConfig = cfg
        self.top_k = num_experts  # K = E slots per token
        self.reset_parameters()

    def forward(self, x_TH: torch.Tensor) -> Routing:
        T, E = x_TH.shape[0], self.num_experts
        logits_TE = self.gate_logits(x_TH)
        probs_TE = logits_TE.softmax(dim=-1)
        capacity = expert_capacity(T, self.cfg.capacity_factor, E)
        token_idx_EC = probs_TE.detach().t().topk(capacity, dim=-1).indices
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TH.device)
        chosen_TE.scatter_(0, token_idx_EC.t(), True)
        expert_ids_TE = torch.arange(E, device=x_TH.device).expand(T, E)
        experts_TK = torch.where(chosen_TE, expert_ids_TE, torch.full_like(expert_ids_TE, -1))
        weights_TK = probs_TE * chosen_TE
        return Routing(experts_TK=experts_TK, weights_TK=weights_TK, probs_TE=probs_TE, logits_TE=logits_TE)

    @classmethod
    def validate_config(cls, cfg: RouterConfig, hidden_size: int, num_experts: int) -> list[str]:
        # top_k is not used (K = E slots); only the base check would be misleading here.
        return []
