"""Load-balance and expert-redundancy metrics: pure functions over expert token counts.

Shape legend: E experts, T tokens, K slots per token, B sequences, N sampled tokens, H hidden
size, F ffn hidden size, e local experts.

Every load metric takes ``counts_E``, the token-slot assignments per expert of ONE layer (any
non-negative numbers: counts, fractions or an EMA of counts; most metrics are scale-free). They
do no communication: for a group-wide figure pass counts already summed over the data x expert
parallel group (``moe_dist.training.step_hook.finish_step`` returns them); for one rank's view pass that
rank's counts. An all-zero load (no tokens yet) gives the value of a perfectly balanced load for
the dispersion metrics (Gini 0, CV 0, MaxVio 0, min/max 1, entropy 1) and counts every expert
as dead, so empty steps never produce NaN.

- ``gini``: LPR's code, ``sum_i (2i - n - 1) p_(i) / (n sum p)`` over loads sorted ascending
  (i = 1..n): 0 uniform, (E-1)/E when one expert takes everything.
- ``min_max_ratio``: min / max load (LPR's "Min-Max"): 1 uniform, 0 with a dead expert.
- ``coefficient_of_variation``: std / mean; ``unbiased=True`` (default) uses the Bessel-corrected
  std as LPR's code (``torch.std``).
- ``normalized_entropy``: entropy of the load fractions / log E, in [0, 1].
- ``max_violation``: MaxVio = max / mean - 1 (Loss-Free Balancing, Wang et al. 2024).
- ``dead_experts`` / ``dead_fraction``: experts whose load is <= ``threshold``.
- ``dropped_fraction``: dropped token-slots / routed token-slots.
- ``EMALoadTracker``: LPR's way of reporting, EMA (0.99) of the per-step hard counts, metrics
  on the EMA-normalised load.
- ``pairwise_expert_similarity`` (PES, SimBal Eq. 5-6): mean over sampled tokens of the mean
  pairwise cosine similarity between ALL experts' outputs for that token.
- ``weight_pairwise_similarity``: a data-free variant, mean pairwise cosine of the experts'
  flattened weights.
- ``sequence_expert_utilization`` (SEU, SimBal), ``routing_entropy`` (mean per-token entropy of
  the router distribution) and ``router_orthogonality_mse`` (SimBal Table 3's mean of
  (R R^T - I)^2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- load dispersion


def _load(counts_E: torch.Tensor) -> torch.Tensor:
    return counts_E.detach().to(torch.float64).reshape(-1)


def gini(counts_E: torch.Tensor) -> float:
    """Gini coefficient of the load (LPR code's formula on loads sorted ascending)."""
    p = _load(counts_E)
    n, total = p.numel(), p.sum()
    if n < 2 or total <= 0:
        return 0.0
    p_sorted = torch.sort(p).values
    i = torch.arange(1, n + 1, dtype=p.dtype, device=p.device)
    return float(torch.sum((2 * i - n - 1) * p_sorted) / (n * total))


def min_max_ratio(counts_E: torch.Tensor) -> float:
    """min load / max load; 1 for an all-zero load."""
    p = _load(counts_E)
    top = p.max()
    return 1.0 if top <= 0 else float(p.min() / top)


def coefficient_of_variation(counts_E: torch.Tensor, unbiased: bool = True) -> float:
    """std / mean of the load (sample std by default, as LPR's code)."""
    p = _load(counts_E)
    mean = p.mean()
    if p.numel() < 2 or mean <= 0:
        return 0.0
    return float(p.std(correction=1 if unbiased else 0) / mean)


def normalized_entropy(counts_E: torch.Tensor) -> float:
    """Entropy of the load fractions divided by log E (1 = uniform, 0 = one expert)."""
    p = _load(counts_E)
    n, total = p.numel(), p.sum()
    if n < 2 or total <= 0:
        return 1.0
    q = p / total
    h = -torch.sum(torch.where(q > 0, q * torch.log(q), torch.zeros_like(q)))
    return float(h / math.log(n))


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = (max - mean) / mean."""
    p = _load(counts_E)
    mean = p.mean()
    return 0.0 if mean <= 0 else float(p.max() / mean - 1.0)


def dead_experts(counts_E: torch.Tensor, threshold: float = 0.0) -> int:
    """Number of experts with load <= ``threshold``."""
    return int((_load(counts_E) <= threshold).sum())


def dead_fraction(counts_E: torch.Tensor, threshold: float = 0.0) -> float:
    return dead_experts(counts_E, threshold) / max(counts_E.numel(), 1)


def dropped_fraction(dropped: float | torch.Tensor, routed: float | torch.Tensor) -> float:
    """Dropped token-slots / routed token-slots (``routed`` = sum of counts before drops)."""
    routed = float(routed)
    return 0.0 if routed <= 0 else float(dropped) / routed


def load_summary(counts_E: torch.Tensor, dropped: float | torch.Tensor | None = None) -> dict[str, float]:
    """All load metrics of one layer in one dict (names as exported to telemetry)."""
    out = {
        "gini": gini(counts_E),
        "min_max_ratio": min_max_ratio(counts_E),
        "cv": coefficient_of_variation(counts_E),
        "normalized_entropy": normalized_entropy(counts_E),
        "max_violation": max_violation(counts_E),
        "dead_experts": float(dead_experts(counts_E)),
        "dead_fraction": dead_fraction(counts_E),
    }
    if dropped is not None:
        out["dropped_fraction"] = dropped_fraction(dropped, counts_E.sum())
    return out


class EMALoadTracker:
    """LPR's reporting: ``hard_load = d * hard_load + (1 - d) * counts`` per step (d = 0.99),
    metrics on ``hard_load / sum``. Starts from zeros, as LPR's ``LoadBalancer``."""

    def __init__(self, num_experts: int, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMALoadTracker: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.hard_load_E = torch.zeros(num_experts, dtype=torch.float64)
        self.steps = 0

    def update(self, counts_E: torch.Tensor) -> None:
        self.hard_load_E.mul_(self.decay).add_(_load(counts_E).cpu(), alpha=1.0 - self.decay)
        self.steps += 1

    @property
    def normalized_load(self) -> torch.Tensor:
        return self.hard_load_E / self.hard_load_E.sum().clamp(min=1e-6)

    def summary(self) -> dict[str, float]:
        p = self.normalized_load
        return {"gini": gini(p), "min_max_ratio": min_max_ratio(p), "cv": coefficient_of_variation(p)}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "hard_load_E": self.hard_load_E.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.steps = float(state["decay"]), int(state["steps"])
        self.hard_load_E = state["hard_load_E"].to(torch.float64).clone()


# ---------------------------------------------------------------- routing statistics


def sequence_expert_utilization(experts_TK: torch.Tensor, batch_size: int, num_experts: int) -> float:
    """SEU (SimBal): mean over sequences of the fraction of experts used by that sequence."""
    experts_BX = experts_TK.reshape(batch_size, -1)
    hits_BE = torch.zeros(batch_size, num_experts, dtype=torch.float32, device=experts_TK.device)
    hits_BE.scatter_add_(1, experts_BX.clamp(min=0), (experts_BX >= 0).to(torch.float32))  # -1 slots add 0
    used_BE = hits_BE > 0
    return float(used_BE.float().mean())


def routing_entropy(probs_TE: torch.Tensor) -> float:
    """Mean over tokens of the entropy (nats) of the router's distribution over experts."""
    p = probs_TE.detach().to(torch.float64)
    return float(-(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(dim=-1).mean())


def router_orthogonality_mse(weight_EH: torch.Tensor) -> float:
    """mean over the E x E entries of (R R^T - I)^2 (SimBal Table 3)."""
    w = weight_EH.detach().to(torch.float64)
    return float(((w @ w.t()) - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)).pow(2).mean())


# ---------------------------------------------------------------- expert redundancy (PES)


def _mean_offdiag_cosine(v_NEX: torch.Tensor) -> torch.Tensor:
    """Per row n: mean over pairs i < j of cos(v[n, i], v[n, j]); [N]."""
    E = v_NEX.shape[1]
    u = F.normalize(v_NEX, dim=-1)
    gram_NEE = u @ u.transpose(1, 2)
    off = gram_NEE.sum(dim=(1, 2)) - gram_NEE.diagonal(dim1=1, dim2=2).sum(dim=-1)
    return off / (E * (E - 1))


def all_expert_outputs(experts: Any, x_NH: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """Run EVERY expert of ``experts`` on every token: ``[N, e, H]``.

    ``experts`` is ``GroupedExperts``-like: ``w1_eHF``, ``w2_eFH``, ``w3_eHF`` (None for GELU)
    and ``activation`` ("swiglu" or "gelu"; ``activation`` overrides it).
    """
    default = "swiglu" if getattr(experts, "w3_eHF", None) is not None else "gelu"
    act = activation or getattr(experts, "activation", default)
    dt = experts.w1_eHF.dtype
    x = x_NH.to(dt)
    h_NeF = torch.einsum("nh,ehf->nef", x, experts.w1_eHF)
    if act == "swiglu":
        h_NeF = F.silu(h_NeF) * torch.einsum("nh,ehf->nef", x, experts.w3_eHF)
    elif act == "gelu":
        h_NeF = F.gelu(h_NeF)
    else:
        raise ValueError(f"all_expert_outputs: unknown activation {act!r}")
    return torch.einsum("nef,efh->neh", h_NeF, experts.w2_eFH)


def pes_from_outputs(out_NEH: torch.Tensor) -> float:
    """PES from the outputs of all E experts on N tokens (use after gathering them across EP)."""
    if out_NEH.shape[1] < 2:
        raise ValueError("PES needs at least 2 experts")
    return float(_mean_offdiag_cosine(out_NEH.detach().to(torch.float64)).mean())


@torch.no_grad()
def pairwise_expert_similarity(
    experts: Any, x_NH: torch.Tensor, activation: str | None = None, chunk: int = 256
) -> float:
    """PES (SimBal Eq. 5-6) of one layer on sampled tokens ``x_NH`` (the layer's expert inputs).

    1. For each token, run every expert on it (dense: cost E times a top-1 pass).
    2. C(x) = 2 / (E (E - 1)) * sum_{i<j} cos(f_i(x), f_j(x)).
    3. PES = mean over the N tokens. SimBal reports the minimum over layers.

    Local experts only: at EP = 1 they are all experts. With EP > 1, each rank computes
    ``all_expert_outputs`` of its experts on the SAME tokens, the caller all-gathers them along
    the expert axis and calls ``pes_from_outputs``.
    """
    total, n = 0.0, x_NH.shape[0]
    for start in range(0, n, chunk):
        out = all_expert_outputs(experts, x_NH[start : start + chunk], activation)
        total += float(_mean_offdiag_cosine(out.to(torch.float64)).sum())
    return total / max(n, 1)


@torch.no_grad()
def weight_pairwise_similarity(experts: Any) -> float:
    """Mean pairwise cosine between experts' flattened weights (w1, w3 if any, w2): PES without data."""
    parts = [experts.w1_eHF, getattr(experts, "w3_eHF", None), experts.w2_eFH]
    flat_eX = torch.cat([p.detach().reshape(p.shape[0], -1) for p in parts if p is not None], dim=1)
    if flat_eX.shape[0] < 2:
        raise ValueError("weight_pairwise_similarity needs at least 2 experts")
    return float(_mean_offdiag_cosine(flat_eX.to(torch.float64).unsqueeze(0))[0])
