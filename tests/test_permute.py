"""Exact tests of the dispatch index maths (no processes): slot sort, capacity drops, chunk transposes."""

import torch

from moe_dist.parallel.permute import capacity_per_expert, rank_splits, sort_slots, transpose_chunks_index


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


def test_transpose_chunks_worked_example() -> None:
    # rank-major (r, e): (r0,e0)=1 (r0,e1)=2 (r1,e0)=3 (r1,e1)=0
    counts_Re = torch.tensor([[1, 2], [3, 0]])
    idx = transpose_chunks_index(counts_Re)
    assert idx.tolist() == [0, 3, 4, 5, 1, 2]  # -> (e0,r0) (e0,r1)x3 (e1,r0)x2


def test_transpose_chunks_inverse_and_labels() -> None:
    g = torch.Generator().manual_seed(0)
    for R, e in [(1, 3), (2, 2), (4, 2), (3, 5)]:
        counts_Re = torch.randint(0, 4, (R, e), generator=g)
        counts_Re[0, 0] = 0  # empty chunks included
        # label each received row with (expert, rank) in rank-major order
        labels = [(le, r) for r in range(R) for le in range(e) for _ in range(int(counts_Re[r, le]))]
        idx = transpose_chunks_index(counts_Re)
        expert_major = [labels[i] for i in idx.tolist()]
        assert expert_major == sorted(labels)  # grouped by expert, then by source rank
        back = transpose_chunks_index(counts_Re.t())
        assert idx[back].tolist() == list(range(len(labels)))


def test_rank_splits() -> None:
    assert rank_splits([1, 2, 0, 4, 5, 0], 3) == [3, 4, 5]
    assert rank_splits([1, 2, 3], 1) == [6]
