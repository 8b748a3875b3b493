"""Global-batch load-balancing loss (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873).

Shape legend: T tokens on this rank, E experts, K slots per token.

The Switch loss ``E * sum_i f_i P_i`` with f_i taken over the whole data x expert parallel
group instead of this rank's micro-batch:

1. The layer all-reduces this micro-batch's counts over the group without gradient
   (``needs_global_counts``): ``load.global_counts_E``, ``load.global_num_tokens``.
2. fbar_i = global_counts_i / (K * global T) (``normalize: slots``; by global T with ``tokens``).
3. P_i = mean of this rank's router probabilities (local, with gradient).
4. Loss on rank j = E * sum_i fbar_i P_i^j. Data-parallel gradient averaging gives the paper's
   ``(1/N_P) sum_j E sum_i fbar_i P_i^j``; with equal T per rank its value averaged over ranks
   equals the single-process loss on the concatenated batch.

Semantics (``semantics``, ``balancing/semantics.py``): ``global``. The training loop averages the
ranks' gradients, so it optimises ``E * sum_i fbar_i * mean_j P_i^j``: with equal T per rank,
exactly the loss of one process holding the micro-step's tokens of all DP x EP ranks, whatever
the DP x EP split. Under gradient accumulation it optimises the mean over the micro-steps of
that loss, so the balance batch is the global batch / ``grad_accum``.

Difference from the paper: with gradient accumulation the paper also accumulates the synced
counts over the accumulation steps of one optimizer step (a buffer: the j-th micro-step sees the
counts of micro-steps 1..j, Megatron-Core's ``global_aux_loss``); here fbar covers the current
micro-step across the group (the Load contract carries no step-level buffer). Neither equals
the loss over the whole step's batch: its counts are known only after the step's last forward,
and the loop runs each micro-step's backward before the next forward.
"""

from __future__ import annotations

from typing import Literal

import torch

from moe_dist.balancing.base import BalancingLoss, CountNormalizedLossConfig, Load, LossConfig
from moe_dist.balancing.semantics import LossSemantics
from moe_dist.balancing.switch import switch_loss
from moe_dist.registry import LOSSES
from moe_dist.routing.base import Router, Routing


class GlobalBatchLossConfig(CountNormalizedLossConfig):
    name: Literal["global_batch"] = "global_batch"


@LOSSES.register("global_batch")
class GlobalBatchLoss(BalancingLoss):
    Config = GlobalBatchLossConfig
    needs_global_counts = True
    semantics = LossSemantics("global")

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        if load.global_counts_E is None or load.global_num_tokens is None:
            raise RuntimeError(
                "global_batch loss: Load.global_counts_E is missing; the layer must all-reduce the counts "
                "for losses with needs_global_counts"
            )
        denom = load.global_num_tokens * self.cfg.slots_per_token(self.top_k)
        denom = denom.clamp(min=1) if isinstance(denom, torch.Tensor) else max(denom, 1)
        f_E = load.global_counts_E / denom
        return switch_loss(f_E, routing.probs_TE, self.num_experts)

    @classmethod
    def validate_config(cls, cfg: LossConfig, router_cls: type[Router], num_experts: int) -> list[str]:
        if getattr(router_cls, "balanced_by_construction", False):
            return [
                f"name: global_batch is constant with router {router_cls.registry_name!r} (every expert "
                f"takes the same number of tokens, so f_i is uniform and the loss has no gradient); remove it"
            ]
        return []
