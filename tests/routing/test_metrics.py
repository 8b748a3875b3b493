"""Load and redundancy metrics against hand-computed values.

Shape legend: E experts, T tokens, K slots, N sampled tokens, H hidden, F ffn hidden.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist import metrics as m
from moe_dist.layers.experts import GroupedExperts


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values)


def test_uniform_load() -> None:
    u = t([5.0, 5.0, 5.0, 5.0])
    assert m.gini(u) == pytest.approx(0.0)
    assert m.min_max_ratio(u) == 1.0
    assert m.coefficient_of_variation(u) == 0.0
    assert m.normalized_entropy(u) == pytest.approx(1.0)
    assert m.max_violation(u) == pytest.approx(0.0)
    assert m.dead_experts(u) == 0 and m.dead_fraction(u) == 0.0


def test_one_hot_load() -> None:
    h = t([0.0, 0.0, 7.0, 0.0])
    assert m.gini(h) == pytest.approx(3 / 4)  # (E - 1) / E
    assert m.min_max_ratio(h) == 0.0
    # values [0,0,0,1]*7: mean 7/4, sample std = 7 * sqrt((3 * 1/16 + 9/16) / 3) = 7/2 -> CV 2
    assert m.coefficient_of_variation(h) == pytest.approx(2.0)
    # population std = 7 * sqrt(3/16) -> CV sqrt(3)
    assert m.coefficient_of_variation(h, unbiased=False) == pytest.approx(math.sqrt(3))
    assert m.normalized_entropy(h) == pytest.approx(0.0)
    assert m.max_violation(h) == pytest.approx(3.0)  # 7 / (7/4) - 1
    assert m.dead_experts(h) == 3 and m.dead_fraction(h) == 0.75


def test_ramp_load() -> None:
    r = t([3.0, 1.0, 4.0, 2.0])
    # sorted 1,2,3,4; sum 10; weights 2i - n - 1 = -3,-1,1,3 -> (-3 - 2 + 3 + 12) / (4 * 10) = 0.25
    assert m.gini(r) == pytest.approx(0.25)
    assert m.min_max_ratio(r) == pytest.approx(0.25)
    assert m.max_violation(r) == pytest.approx(4 / 2.5 - 1)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert m.normalized_entropy(r) == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-6)
    assert m.dead_experts(r, threshold=1.0) == 1
    # scale-free: fractions give the same dispersion metrics as counts
    assert m.gini(r / 10) == pytest.approx(m.gini(r)) and m.coefficient_of_variation(r * 3) == pytest.approx(
        m.coefficient_of_variation(r)
    )


def test_empty_load_is_finite() -> None:
    z = torch.zeros(4)
    assert (m.gini(z), m.min_max_ratio(z), m.coefficient_of_variation(z), m.max_violation(z)) == (
        0.0,
        1.0,
        0.0,
        0.0,
    )
    assert m.normalized_entropy(z) == 1.0 and m.dead_experts(z) == 4
    assert all(math.isfinite(v) for v in m.load_summary(z, dropped=0.0).values())


def test_one_expert_is_balanced() -> None:
    one = t([6.0])
    assert (m.gini(one), m.min_max_ratio(one), m.coefficient_of_variation(one)) == (0.0, 1.0, 0.0)
    assert (m.normalized_entropy(one), m.max_violation(one), m.dead_experts(one)) == (1.0, 0.0, 0)
    assert m.dead_experts(t([0.0])) == 1 and m.dead_fraction(t([0.0])) == 1.0


def test_batched_forms_are_per_layer_with_their_options() -> None:
    """``*_L`` on a stack: row l is the per-layer value of layer l, whatever the other rows
    hold (an empty layer next to a busy one), options included."""
    counts_LE = torch.stack([t([3.0, 1.0, 4.0, 2.0]), torch.zeros(4), t([0.0, 0.0, 7.0, 0.0])])
    cv_L = m.coefficient_of_variation_L(counts_LE, unbiased=False)
    assert cv_L.tolist() == pytest.approx([math.sqrt(1.25) / 2.5, 0.0, math.sqrt(3)])
    assert m.dead_experts_L(counts_LE, threshold=1.0).tolist() == [1.0, 4.0, 3.0]
    assert m.dead_fraction_L(counts_LE, threshold=1.0).tolist() == [0.25, 1.0, 0.75]
    assert m.gini_L(counts_LE).tolist() == pytest.approx([0.25, 0.0, 0.75])
    assert m.normalized_entropy_L(counts_LE)[1:].tolist() == [1.0, 0.0]
    assert m.min_max_ratio_L(counts_LE).tolist() == [0.25, 1.0, 0.0]
    assert m.max_violation_L(counts_LE).tolist() == pytest.approx([0.6, 0.0, 3.0])
    assert m.load_stats_L(torch.zeros(0, 4))["gini"].shape == (0,)  # no MoE layers


def test_dropped_fraction_and_summary() -> None:
    assert m.dropped_fraction(3, 12) == 0.25 and m.dropped_fraction(0, 0) == 0.0
    s = m.load_summary(t([3.0, 1.0, 4.0, 2.0]), dropped=torch.tensor(2.0))
    assert s["gini"] == pytest.approx(0.25) and s["dropped_fraction"] == pytest.approx(0.2)
    assert set(s) == {
        "gini",
        "min_max_ratio",
        "cv",
        "normalized_entropy",
        "max_violation",
        "dead_experts",
        "dead_fraction",
        "dropped_fraction",
    }


def test_ema_tracker_like_lpr() -> None:
    tr = m.EMALoadTracker(2)
    assert tr.decay == 0.99
    tr.update(t([1.0, 0.0]))
    assert tr.hard_load_E.tolist() == pytest.approx([0.01, 0.0])
    assert tr.normalized_load.tolist() == pytest.approx([1.0, 0.0])
    tr.update(t([0.0, 1.0]))
    assert tr.hard_load_E.tolist() == pytest.approx([0.0099, 0.01])
    p = [0.0099 / 0.0199, 0.01 / 0.0199]
    s = tr.summary()
    assert s["min_max_ratio"] == pytest.approx(p[0] / p[1])
    assert s["gini"] == pytest.approx((-1 * p[0] + 1 * p[1]) / 2)  # n=2: weights -1, +1; sum p = 1
    clone = m.EMALoadTracker(2, decay=0.5)
    clone.load_state_dict(tr.state_dict())
    assert clone.decay == 0.99 and torch.equal(clone.hard_load_E, tr.hard_load_E) and clone.steps == 2
    with pytest.raises(ValueError, match="decay"):
        m.EMALoadTracker(2, decay=1.0)


def test_sequence_expert_utilization_and_entropy() -> None:
    # B=2, S=2, K=2, E=4: seq 0 uses {0, 1} -> 0.5; seq 1 uses {0, 2, 3} (a -1 slot) -> 0.75
    experts = torch.tensor([[0, 1], [1, 0], [2, 3], [0, -1]])
    assert m.sequence_expert_utilization(experts, batch_size=2, num_experts=4) == pytest.approx(0.625)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert m.routing_entropy(probs) == pytest.approx(math.log(2) / 2)


def test_router_orthogonality_mse() -> None:
    # R R^T - I = [[0, 1], [1, 1]] -> mean of squares 3/4
    assert m.router_orthogonality_mse(t([[1.0, 0.0], [1.0, 1.0]]).reshape(2, 2)) == pytest.approx(0.75)
    q = torch.linalg.qr(torch.randn(8, 8)).Q[:4]
    assert m.router_orthogonality_mse(q) == pytest.approx(0.0, abs=1e-10)


def experts_with(w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> GroupedExperts:
    e, H, F = w1.shape
    ex = GroupedExperts(e, H, F, activation="swiglu" if w3 is not None else "gelu")
    with torch.no_grad():
        ex.w1_eHF.copy_(w1)
        ex.w2_eFH.copy_(w2)
        if w3 is not None:
            ex.w3_eHF.copy_(w3)
    return ex


@pytest.mark.parametrize("swiglu", [True, False])
def test_pes_hand_constructed(swiglu: bool) -> None:
    torch.manual_seed(0)
    H, F = 6, 5
    w1, w3, w2 = torch.randn(H, F), torch.randn(H, F), torch.randn(F, H)
    # experts 0 and 1 identical (cos 1), expert 2 = expert 0 with w2 negated (cos -1 with both)
    ex = experts_with(
        torch.stack([w1, w1, w1]), torch.stack([w3, w3, w3]) if swiglu else None, torch.stack([w2, w2, -w2])
    )
    x = torch.randn(10, H)
    assert m.pairwise_expert_similarity(ex, x) == pytest.approx((1 - 1 - 1) / 3, abs=1e-6)
    assert m.pairwise_expert_similarity(ex, x, chunk=3) == pytest.approx(-1 / 3, abs=1e-6)


def test_pes_matches_the_expert_module_and_pes_from_outputs() -> None:
    torch.manual_seed(0)
    e, H, F, N = 4, 8, 6, 5
    ex = GroupedExperts(e, H, F, activation="swiglu")
    x = torch.randn(N, H)
    out = m.all_expert_outputs(ex, x)
    # the real module on the same rows: every token sent to every expert (expert-major rows)
    ref = ex(x.repeat(e, 1), torch.full((e,), N)).reshape(e, N, H).transpose(0, 1)
    assert torch.allclose(out, ref, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(out.unsqueeze(2), out.unsqueeze(1), dim=-1)  # [N, e, e]
    iu = torch.triu_indices(e, e, offset=1)
    want = cos[:, iu[0], iu[1]].mean().item()
    assert m.pairwise_expert_similarity(ex, x) == pytest.approx(want, abs=1e-6)
    # EP > 1: halves computed separately and concatenated along the expert axis give the same PES
    assert m.pes_from_outputs(torch.cat([out[:, :2], out[:, 2:]], dim=1)) == pytest.approx(want, abs=1e-6)


def test_weight_pairwise_similarity() -> None:
    torch.manual_seed(0)
    H, F = 4, 3
    w1, w3, w2 = torch.randn(H, F), torch.randn(H, F), torch.randn(F, H)
    ex = experts_with(torch.stack([w1, w1, -w1]), torch.stack([w3, w3, -w3]), torch.stack([w2, w2, -w2]))
    assert m.weight_pairwise_similarity(ex) == pytest.approx(-1 / 3, abs=1e-6)
    # GELU experts (no w3) whose flattened (w1, w2) vectors are orthogonal
    w1_eHF = torch.tensor([[[1.0], [0.0], [0.0], [0.0]], [[0.0], [1.0], [0.0], [0.0]]])
    w2_eFH = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 0.0]]])
    assert m.weight_pairwise_similarity(experts_with(w1_eHF, None, w2_eFH)) == pytest.approx(0.0, abs=1e-7)
