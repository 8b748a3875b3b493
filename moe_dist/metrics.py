"""Load-balance and expert-redundancy metrics: pure functions over expert token counts.

Shape legend: L layers, E experts, T tokens, K slots per token, B sequences, N sampled tokens,
H hidden size, F ffn hidden size, e local experts.

Every load metric takes ``counts_E``, the token-slot assignments per expert of ONE layer (any
non-negative numbers: counts, fractions or an EMA of counts; most metrics are scale-free), and
has a batched form over layers, ``gini_L(counts_LE)`` etc. (``L`` layers), which holds the one
definition: the per-layer function is the batched one on a ``[1, E]`` stack, and
``load_stats_L`` gives every metric of every layer at once (the telemetry exporter's form). They
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
#
# One definition per metric, batched over layers: ``*_L(counts_LE)`` gives the value of every
# layer (float64 ``[L]``) in a fixed number of tensor ops whatever L is, which is what the
# exporter thread needs. The per-layer functions run the same code on a ``[1, E]`` stack.
# Divisions by a zero total or mean are computed and then replaced (``torch.where``): no
# autograd runs here, so the unused NaN branch costs nothing and the edge values stay exact.


def _loads_LE(counts_LE: torch.Tensor) -> torch.Tensor:
    """float64 ``[L, E]``, detached."""
    return counts_LE.detach().to(torch.float64)


def _one_layer(counts_E: torch.Tensor) -> torch.Tensor:
    """One layer's load as a ``[1, E]`` stack."""
    return _loads_LE(counts_E).reshape(1, -1)


def gini_L(counts_LE: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of the load (LPR code's formula on loads sorted ascending); 0 for an
    all-zero load or one expert."""
    c = _loads_LE(counts_LE)
    E, total = c.shape[1], c.sum(1)
    if E < 2:
        return torch.zeros_like(total)
    i = torch.arange(1, E + 1, dtype=c.dtype, device=c.device)
    g = ((2 * i - E - 1) * c.sort(1).values).sum(1) / (E * total)
    return torch.where(total > 0, g, 0.0)


def min_max_ratio_L(counts_LE: torch.Tensor) -> torch.Tensor:
    """min load / max load; 1 for an all-zero load."""
    c = _loads_LE(counts_LE)
    top = c.max(1).values
    return torch.where(top > 0, c.min(1).values / top, 1.0)


def coefficient_of_variation_L(counts_LE: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """std / mean of the load (sample std by default, as LPR's code); 0 for an all-zero load or
    one expert."""
    c = _loads_LE(counts_LE)
    E, mean = c.shape[1], c.mean(1)
    if E < 2 or c.shape[0] == 0:  # no layers: std would warn about its degrees of freedom
        return torch.zeros_like(mean)
    return torch.where(mean > 0, c.std(1, correction=1 if unbiased else 0) / mean, 0.0)


def normalized_entropy_L(counts_LE: torch.Tensor) -> torch.Tensor:
    """Entropy of the load fractions divided by log E (1 = uniform, 0 = one expert); 1 for an
    all-zero load or one expert."""
    c = _loads_LE(counts_LE)
    E, total = c.shape[1], c.sum(1)
    if E < 2:
        return torch.ones_like(total)
    q = c / total[:, None]
    h = -torch.where(q > 0, q * torch.log(q), 0.0).sum(1)
    return torch.where(total > 0, h / math.log(E), 1.0)


def max_violation_L(counts_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max - mean) / mean; 0 for an all-zero load."""
    c = _loads_LE(counts_LE)
    mean = c.mean(1)
    return torch.where(mean > 0, c.max(1).values / mean - 1.0, 0.0)


def dead_experts_L(counts_LE: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Number of experts with load <= ``threshold`` (float64, like the other metrics)."""
    return (_loads_LE(counts_LE) <= threshold).sum(1).to(torch.float64)


def dead_fraction_L(counts_LE: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Fraction of the experts with load <= ``threshold``."""
    return dead_experts_L(counts_LE, threshold) / max(counts_LE.shape[1], 1)


def load_stats_L(counts_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """All load metrics of every layer, float64 ``[L]`` each (names as exported to telemetry)."""
    c = _loads_LE(counts_LE)  # once: the metrics below find it float64 already
    return {
        "gini": gini_L(c),
        "min_max_ratio": min_max_ratio_L(c),
        "cv": coefficient_of_variation_L(c),
        "normalized_entropy": normalized_entropy_L(c),
        "max_violation": max_violation_L(c),
        "dead_experts": dead_experts_L(c),
        "dead_fraction": dead_fraction_L(c),
    }


def gini(counts_E: torch.Tensor) -> float:
    """Gini coefficient of one layer's load (``gini_L``)."""
    return float(gini_L(_one_layer(counts_E))[0])


def min_max_ratio(counts_E: torch.Tensor) -> float:
    """min load / max load of one layer (``min_max_ratio_L``)."""
    return float(min_max_ratio_L(_one_layer(counts_E))[0])


def coefficient_of_variation(counts_E: torch.Tensor, unbiased: bool = True) -> float:
    """std / mean of one layer's load (``coefficient_of_variation_L``)."""
    return float(coefficient_of_variation_L(_one_layer(counts_E), unbiased)[0])


def normalized_entropy(counts_E: torch.Tensor) -> float:
    """Normalised entropy of one layer's load fractions (``normalized_entropy_L``)."""
    return float(normalized_entropy_L(_one_layer(counts_E))[0])


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio of one layer (``max_violation_L``)."""
    return float(max_violation_L(_one_layer(counts_E))[0])


def dead_experts(counts_E: torch.Tensor, threshold: float = 0.0) -> int:
    """Number of experts of one layer with load <= ``threshold`` (``dead_experts_L``)."""
    return int(dead_experts_L(_one_layer(counts_E), threshold)[0])


def dead_fraction(counts_E: torch.Tensor, threshold: float = 0.0) -> float:
    """Fraction of one layer's experts with load <= ``threshold`` (``dead_fraction_L``)."""
    return float(dead_fraction_L(_one_layer(counts_E), threshold)[0])


def dropped_fraction(dropped: float | torch.Tensor, routed: float | torch.Tensor) -> float:
    """Dropped token-slots / routed token-slots (``routed`` = sum of counts before drops)."""
    routed = float(routed)
    return 0.0 if routed <= 0 else float(dropped) / routed


def load_summary(counts_E: torch.Tensor, dropped: float | torch.Tensor | None = None) -> dict[str, float]:
    """All load metrics of one layer in one dict (``load_stats_L`` of a ``[1, E]`` stack)."""
    out = {k: float(v[0]) for k, v in load_stats_L(_one_layer(counts_E)).items()}
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
        self.hard_load_E.mul_(self.decay).add_(_loads_LE(counts_E).reshape(-1).cpu(), alpha=1.0 - self.decay)
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
