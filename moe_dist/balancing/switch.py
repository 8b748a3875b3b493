"""Switch / GShard load-balancing loss: ``E * sum_i f_i P_i``, per layer or over the whole model.

Shape legend: T tokens on this rank, E experts, K slots per token, L MoE layers.

- f_i: this rank's token-slot assignments to expert i over a normaliser (``normalize``,
  `CountNormalizedLossConfig`): ``slots`` = counts / (K * T), minimum 1 at uniform routing for
  any top-k (Switch's k = 1 formula, Fedus et al. 2021); ``tokens`` = counts / T, minimum K
  (Hugging Face's ``load_balancing_loss_func``, OLMoE, SimBal's code).
- P_i: mean router probability of expert i over the T tokens. f carries no gradient (counts are
  a step function), so the gradient flows through P only.

``scope``:

- ``layer`` (default): one loss per MoE layer on its own routing, summed over layers by the
  model (Megatron-Core, torchtitan, DeepSpeed).
- ``model``: ONE loss over all layers' routing at once, as Hugging Face's
  ``load_balancing_loss_func`` (transformers ``models/mixtral/modeling_mixtral.py`` and
  ``models/qwen3_moe/modeling_qwen3_moe.py``, 4.51) computes it for Mixtral, Qwen3-MoE and the
  baselines of the LPR paper: the router logits of every layer are concatenated to ``[L*T, E]``,
  so f and P are means over all L*T rows: f_i = (sum_l counts_li) / (L * T) and
  P_i = (1/L) sum_l P_li, loss = E * sum_i f_i P_i. Only the layer-averaged load is balanced:
  one layer may collapse while another compensates. Each layer's `Gate` hands its
  (counts, T, sum of probabilities) to the model as a `ScopePart`; the model calls
  `SwitchLoss.combine` once per forward (``MoETransformer.forward``). Under Megatron-Core the
  router lives inside Megatron's layer and no model-level hook exists, so ``scope: model`` is a
  config error there. HF's function (with no attention mask) counts every row, padding included;
  we have no padding.

Semantics (``semantics``, ``balancing/semantics.py``): ``micro_batch``, as the sources define it
(Switch's f and P per batch of a core, Hugging Face per micro-batch and rank, Megatron-Core's
``aux_loss`` per micro-batch): the loss is computed per rank on its own micro-batch and the
training loop optimises its mean over the step's micro-batches ("micro-batch balancing" in Qiu
et al. 2025). That mean does not depend on which rank or micro-step holds a micro-batch (DP,
EP and ``grad_accum`` may be traded at a fixed micro-batch size), but it does depend on the
micro-batch size, by definition: ``global_batch`` is the same loss with the group-wide f, whose
objective does not depend on the DP x EP split. ``scope: model``: ``micro_batch`` over all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from moe_dist.balancing.base import BalancingLoss, CountNormalizedLossConfig, Load, LossConfig
from moe_dist.balancing.semantics import LossSemantics
from moe_dist.registry import LOSSES
from moe_dist.routing.base import Router, Routing


class SwitchLossConfig(CountNormalizedLossConfig):
    name: Literal["switch"] = "switch"
    scope: Literal["layer", "model"] = Field(
        "layer", description="layer: a loss per MoE layer; model: one loss over all layers at once (HF)"
    )


def switch_loss(f_E: torch.Tensor, probs_TE: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` with P the mean of ``probs_TE`` over tokens (fp32 or wider)."""
    P_E = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32)).mean(dim=0)
    return num_experts * torch.sum(f_E.detach().to(P_E.dtype) * P_E)


@dataclass
class ScopePart:
    """One layer's share of a model-scope loss: slot counts (no gradient), tokens, and the sum
    over its tokens of the router probabilities (with gradient)."""

    counts_E: torch.Tensor
    num_tokens: int
    prob_sum_E: torch.Tensor


@LOSSES.register("switch")
class SwitchLoss(BalancingLoss):
    Config = SwitchLossConfig
    semantics = LossSemantics("micro_batch")

    @classmethod
    def semantics_for(cls, cfg: LossConfig) -> LossSemantics:
        scope = getattr(cfg, "scope", "layer")
        return LossSemantics("micro_batch", layers="model") if scope == "model" else cls.semantics

    @property
    def model_scope(self) -> bool:
        return self.cfg.scope == "model"

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        """The layer's own loss (for ``scope: model`` the layer's diagnostic value only)."""
        f_E = load.counts_E / max(load.num_tokens * self.cfg.slots_per_token(self.top_k), 1)
        return switch_loss(f_E, routing.probs_TE, self.num_experts)

    def part(self, routing: Routing, load: Load) -> ScopePart:
        probs_TE = routing.probs_TE
        prob_sum_E = probs_TE.to(torch.promote_types(probs_TE.dtype, torch.float32)).sum(dim=0)
        return ScopePart(load.counts_E.detach(), load.num_tokens, prob_sum_E)

    def combine(self, parts: list[ScopePart]) -> torch.Tensor:
        """``E * sum_i f_i P_i`` over the rows of every layer at once (HF's concatenation)."""
        rows = sum(p.num_tokens for p in parts)
        counts_E = torch.stack([p.counts_E for p in parts]).sum(dim=0)
        P_E = torch.stack([p.prob_sum_E for p in parts]).sum(dim=0) / max(rows, 1)
        f_E = counts_E.to(P_E.dtype) / max(rows * self.cfg.slots_per_token(self.top_k), 1)
        return self.num_experts * torch.sum(f_E * P_E)

    @classmethod
    def validate_config(cls, cfg: LossConfig, router_cls: type[Router], num_experts: int) -> list[str]:
        if getattr(router_cls, "balanced_by_construction", False):
            return [
                f"name: switch is constant with router {router_cls.registry_name!r} (every expert takes the "
                f"same number of tokens, so f_i is uniform and the loss has no gradient); remove it"
            ]
        return []
