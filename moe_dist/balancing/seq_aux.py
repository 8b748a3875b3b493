"""DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437, Eq. 17-20).

Shape legend: B sequences, S tokens per sequence (T = B * S on this rank), E experts, K slots.

1. Per sequence b: f_bi = E / (K * S) * (number of tokens of b that selected expert i).
2. P_bi = (1/S) sum_s s'_{b,s,i}, with s' the router's normalised scores (``routing.probs_TE``:
   sigmoid scores divided by their sum for ``topk_sigmoid_bias``, softmax probabilities for
   softmax routers).
3. Loss = mean over the B sequences of sum_i f_bi P_bi; 1 at perfect balance within every
   sequence. DeepSeek-V3 uses coefficient alpha = 1e-4 on top of the bias-based balancing.

``normalize: tokens`` drops the 1/K: f_bi = E / S * count, the sequence-level LBL of SimBal's
baseline (st-moe style: f and P per sequence, f summing to K, ``E * sum_i f_bi P_bi``, mean over
the batch; the SimBal paper's App. A, coefficient 0.01), K times the ``slots`` value.

Needs the micro-batch shape (``load.batch_size``, ``load.seq_len``); slots marked -1 (expert
choice) are not counted.

Semantics (``semantics``, ``balancing/semantics.py``): ``sequence``. A MEAN over the micro-batch's
sequences, so the loop's mean over micro-batches of equal B is the mean over all sequences of the
step: the objective does not depend on the micro-batch size, DP, EP or ``grad_accum`` (Megatron-LM
issue 5798: a sum over sequences did). With expert-choice routing a token's experts depend on its
micro-batch, and the loss becomes a micro-batch statistic (`LossSemantics.under`).
"""

from __future__ import annotations

from typing import Literal

import torch

from moe_dist.balancing.base import BalancingLoss, CountNormalizedLossConfig, Load
from moe_dist.balancing.semantics import LossSemantics
from moe_dist.registry import LOSSES
from moe_dist.routing.base import Router, Routing


class SeqAuxLossConfig(CountNormalizedLossConfig):
    name: Literal["seq_aux"] = "seq_aux"


def sequence_counts(experts_TK: torch.Tensor, batch_size: int, num_experts: int) -> torch.Tensor:
    """Token-slot assignments per sequence and expert (no gradient); -1 slots are skipped."""
    experts_BSK = experts_TK.reshape(batch_size, -1, experts_TK.shape[-1])
    valid = experts_BSK >= 0
    counts_BE = torch.zeros(batch_size, num_experts, dtype=torch.float32, device=experts_TK.device)
    idx_BX = experts_BSK.clamp(min=0).reshape(batch_size, -1)
    return counts_BE.scatter_add_(1, idx_BX, valid.reshape(batch_size, -1).to(torch.float32))


@LOSSES.register("seq_aux")
class SeqAuxLoss(BalancingLoss):
    Config = SeqAuxLossConfig
    semantics = LossSemantics("sequence")

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        B, S, E = load.batch_size, load.seq_len, self.num_experts
        if B * S != routing.probs_TE.shape[0]:
            raise ValueError(
                f"seq_aux loss: batch_size * seq_len ({B} * {S}) != number of routed tokens "
                f"({routing.probs_TE.shape[0]})"
            )
        probs_BSE = routing.probs_TE.reshape(B, S, E)
        probs_BSE = probs_BSE.to(torch.promote_types(probs_BSE.dtype, torch.float32))
        f_BE = sequence_counts(routing.experts_TK, B, E).to(probs_BSE.dtype) * (
            E / (self.cfg.slots_per_token(self.top_k) * S)
        )
        P_BE = probs_BSE.mean(dim=1)
        return (f_BE * P_BE).sum(dim=-1).mean()
