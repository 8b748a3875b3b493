"""Exact tests of the dispatch index maths (no processes): slot sort and capacity drops."""

import torch

from moe_dist.ops.slot_sort import capacity_per_expert, sort_slots


def test_sort_slots_is_stable_expert_major_and_skips_unused() -> None:
    # T=4, K=2; slots s = t*K + k
    experts_TK = torch.tensor([[2, 0], [0, -1], [3, 2], [0, 1]])
    order_S, counts_E = sort_slots(experts_TK.reshape(-1), num_experts=4)
    assert counts_E.tolist() == [3, 1, 2, 1]
    # kept: e0 -> slots 1, 2, 6 (token order); e1 -> 7; e2 -> 0, 5; e3 -> 4; then unused slot 3
    assert order_S.tolist() == [1, 2, 6, 7, 0, 5, 4, 3]


def test_capacity_keeps_highest_weights_ties_by_token_order() -> None:
    # T=5, K=1, E=2; capacity 2 per expert
    experts_S = torch.tensor([0, 0, 0, 1, 0])
    weights_S = torch.tensor([0.5, 0.9, 0.5, 0.3, 0.5])
    order_S, counts_E = sort_slots(experts_S, 2, weights_S, capacity=2)
    # e0 candidates: s1 (0.9) first, then the tie 0.5 among s0, s2, s4 -> s0 (earliest token)
    assert counts_E.tolist() == [2, 1]
    assert order_S[:3].tolist() == [0, 1, 3]  # kept rows in token order inside the expert
    assert sorted(order_S[3:].tolist()) == [2, 4]


def test_capacity_formula() -> None:
    assert capacity_per_expert(1.0, 10, 2, 8) == 3  # ceil(2.5)
    assert capacity_per_expert(1.25, 16, 2, 8) == 5
    assert capacity_per_expert(2.0, 4, 1, 8) == 1
