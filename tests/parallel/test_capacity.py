"""Capacity mode drops exactly the token-slots the documented policy names, and reports how many.

Policy (moe_dist.ops.slot_sort.sort_slots): expert i keeps at most
``capacity = ceil(capacity_factor * T * K / E)`` of this rank's slots, highest router weight
first, ties by earlier token; a dropped slot contributes 0 to its token's output.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from rank_processes import run_on_ranks

from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.dispatcher import AllToAllDispatcher
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.routing.base import Routing


def test_dispatch_keeps_the_documented_slots() -> None:
    # T=6 tokens, K=2, E=3, capacity factor 0.5 -> capacity ceil(0.5 * 6 * 2 / 3) = 2
    experts_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, -1], [0, 1]])
    weights_TK = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.6, 0.4], [1.0, 0.0], [0.5, 0.5]])
    # e0 candidates (token: weight): 0:.6 1:.5 2:.7 3:.4 5:.5 -> keep 2 (.7), 0 (.6); drop 1, 3, 5
    # e1 candidates: 0:.4 2:.3 3:.6 5:.5 -> keep 3 (.6), 5 (.5); drop 0, 2
    # e2 candidates: 1:.5 4:1.0 -> keep both
    x_TH = torch.arange(1.0, 7.0).reshape(6, 1)  # row value = token id + 1
    routing = Routing(experts_TK=experts_TK, weights_TK=weights_TK, probs_TE=torch.full((6, 3), 1 / 3))
    dispatcher = AllToAllDispatcher(3, None, capacity_factor=0.5)
    expert_in, tokens_per_expert, ctx = dispatcher.dispatch(x_TH, routing)
    assert tokens_per_expert.tolist() == [2, 2, 2]
    assert expert_in.reshape(-1).tolist() == [1.0, 3.0, 4.0, 6.0, 2.0, 5.0]  # token order inside an expert
    assert ctx.dropped == 5
    assert ctx.row_weights_Y.tolist() == pytest.approx([0.6, 0.7, 0.6, 0.5, 0.5, 1.0])
    y = dispatcher.combine(expert_in * 10 * ctx.row_weights_Y.unsqueeze(1), ctx)  # expert = x10
    want = [0.6 * 10, 0.5 * 20, 0.7 * 30, 0.6 * 40, 1.0 * 50, 0.5 * 60]
    torch.testing.assert_close(y.reshape(-1), torch.tensor(want))


def _reference_with_drops(
    layer_weights: dict, x: torch.Tensor, cf: float, K: int
) -> tuple[torch.Tensor, int]:
    """Plain-Python policy: per expert, sort candidates by (-weight, token), keep the first C."""
    W, w1, w3, w2 = (layer_weights[k] for k in ("router", "w1", "w3", "w2"))
    T, E = x.shape[0], W.shape[0]
    probs = torch.softmax(x @ W.t(), -1)
    top_p, top_e = probs.topk(K, -1)
    top_w = top_p / top_p.sum(-1, keepdim=True)
    C = math.ceil(cf * T * K / E)
    kept = set()
    for e in range(E):
        cands = [(-float(top_w[t, k]), t, k) for t in range(T) for k in range(K) if int(top_e[t, k]) == e]
        kept.update((t, k) for _, t, k in sorted(cands)[:C])
    y = torch.zeros_like(x)
    for t, k in kept:
        e = int(top_e[t, k])
        y[t] += top_w[t, k] * ((F.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e])
    return y, T * K - len(kept)


def _layer(cf: float, groups: ParallelGroups) -> MoELayer:
    cfg = MoEConfig(
        num_experts=4,
        router={"name": "topk_softmax", "top_k": 2},
        capacity_factor=cf,
        experts={"ffn_hidden_size": 6},
    )
    return MoELayer(cfg, 5, groups)


def _weights() -> dict:
    g = torch.Generator().manual_seed(11)
    return {
        "router": torch.randn(4, 5, generator=g),
        "w1": torch.randn(4, 5, 6, generator=g),
        "w3": torch.randn(4, 5, 6, generator=g),
        "w2": torch.randn(4, 6, 5, generator=g),
        "x": [torch.randn(9 + 3 * r, 5, generator=g) for r in range(2)],
    }


def _run(layer: MoELayer, wts: dict, rank: int) -> tuple[torch.Tensor, float, list[float]]:
    lo, e = layer.experts.first_expert, layer.num_local_experts
    with torch.no_grad():
        layer.gate.router.weight.copy_(wts["router"])
        layer.experts.w1_eHF.copy_(wts["w1"][lo : lo + e])
        layer.experts.w3_eHF.copy_(wts["w3"][lo : lo + e])
        layer.experts.w2_eFH.copy_(wts["w2"][lo : lo + e])
    y, _ = layer(wts["x"][rank])
    return y.detach(), float(layer.gate.dropped_tokens), layer.gate.tokens_per_expert_E.tolist()


@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_layer_capacity_matches_policy_reference(cf: float) -> None:
    wts = _weights()
    y, dropped, _ = _run(_layer(cf, ParallelGroups.single()), wts, 0)
    want_y, want_dropped = _reference_with_drops(wts, wts["x"][0], cf, 2)
    assert dropped == want_dropped
    if cf == 0.5:
        assert want_dropped > 0
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-4)


def _body(rank: int, world: int) -> tuple:
    return _run(_layer(0.5, ParallelGroups.build(world)), _weights(), rank)


@pytest.mark.slow
def test_capacity_under_expert_parallelism() -> None:
    """Capacity is per source rank, so each rank drops exactly what it would drop alone."""
    wts = _weights()
    for rank, (y, dropped, counts) in enumerate(run_on_ranks(_body, 2)):
        want_y, want_dropped = _reference_with_drops(wts, wts["x"][rank], 0.5, 2)
        assert dropped == want_dropped > 0
        assert sum(counts) == wts["x"][rank].shape[0] * 2  # counts are before drops
        torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-4)
