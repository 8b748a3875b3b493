"""finish_step: one all-reduce of every layer's counts, router.after_step with them, stats reset;
eval forwards leave the balancing statistics alone."""

import pytest
import torch
from rank_processes import run_on_ranks

from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.routing.topk_softmax import TopKSoftmaxRouter
from moe_dist.training.step_hook import finish_step

E, H = 4, 8


class AfterStepRecorder(TopKSoftmaxRouter):
    """Softmax top-k that keeps the counts of its last after_step in a buffer (not registered:
    the test swaps it in, so the global registry stays as the other tests expect)."""

    def __init__(self, cfg, hidden_size: int, num_experts: int) -> None:  # noqa: ANN001
        super().__init__(cfg, hidden_size, num_experts)
        self.register_buffer("seen_E", torch.zeros(num_experts))
        self.calls = 0

    @torch.no_grad()
    def after_step(self, global_counts_E: torch.Tensor) -> None:
        self.seen_E.copy_(global_counts_E)
        self.calls += 1


def _layers(groups: ParallelGroups) -> list[MoELayer]:
    cfg = MoEConfig(
        num_experts=E, router={"name": "topk_softmax", "top_k": 2}, experts={"ffn_hidden_size": 8}
    )
    torch.manual_seed(0)
    layers = [MoELayer(cfg, H, groups) for _ in range(2)]
    for layer in layers:
        layer.gate.router = AfterStepRecorder(cfg.router, H, E)
    return layers


def _micro_batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(2, 3 + rank, H, generator=g) for _ in range(2)]  # 2 micro-batches


def _step(layers: list[MoELayer], rank: int, groups: ParallelGroups) -> dict:
    local = []
    for layer in layers:
        counts = torch.zeros(E)
        for x in _micro_batches(rank):
            y, _ = layer(x)
            counts += layer.gate.router(x.reshape(-1, H)).counts_E()
        local.append(counts)
    global_counts = finish_step(layers, groups)
    return {
        "local": local,
        "global": global_counts.counts_E,
        "seen": [layer.gate.router.seen_E.clone() for layer in layers],
        "calls": [layer.gate.router.calls for layer in layers],
        "after_reset": [float(layer.gate.tokens_per_expert_E.sum()) for layer in layers],
    }


def _body(rank: int, world: int) -> dict:
    groups = ParallelGroups.build(ep_size=2)
    return _step(_layers(groups), rank, groups)


@pytest.mark.slow
def test_finish_step_all_reduces_counts_over_the_group() -> None:
    results = run_on_ranks(_body, 2)
    for i in range(2):
        want = results[0]["local"][i] + results[1]["local"][i]
        assert want.sum() == 2 * 2 * (2 * 3 + 2 * 4)  # K * micro-batches * tokens, both ranks
        for res in results:
            assert torch.equal(res["global"][i], want)
            assert torch.equal(res["seen"][i], want)
            assert res["calls"][i] == 1
            assert res["after_reset"][i] == 0.0


def test_finish_step_single_process_and_eval_leaves_stats_alone() -> None:
    layers = _layers(ParallelGroups.single())
    res = _step(layers, 0, ParallelGroups.single())
    assert torch.equal(res["global"][0], res["local"][0]) and res["calls"] == [1, 1]
    layer = layers[0]
    x = _micro_batches(0)[0]
    layer(x)
    before = (
        layer.gate.tokens_per_expert_E.clone(),
        layer.gate.received_per_local_expert_e.clone(),
        dict(layer.gate.last_aux),
    )
    layer.eval()
    with torch.no_grad():
        y, aux = layer(x)
    assert torch.equal(layer.gate.tokens_per_expert_E, before[0])
    assert torch.equal(layer.gate.received_per_local_expert_e, before[1])
    assert layer.gate.last_aux == before[2]
    assert float(layer.gate.tokens_per_expert_E.sum()) == 2 * x.shape[0] * x.shape[1]
    layer.train()
    layer(x)
    assert float(layer.gate.tokens_per_expert_E.sum()) == 2 * 2 * x.shape[0] * x.shape[1]


def test_timing_accumulates_only_when_asked_and_resets() -> None:
    layer = _layers(ParallelGroups.single())[0]
    x = _micro_batches(0)[0]
    layer(x)
    assert layer.gate.a2a_seconds == 0.0 and layer.gate.expert_seconds == 0.0
    layer.gate.timing = True
    layer(x)
    layer(x)
    assert layer.gate.a2a_seconds > 0.0 and layer.gate.expert_seconds > 0.0
    layer.gate.reset_stats()
    assert layer.gate.a2a_seconds == 0.0 and layer.gate.expert_seconds == 0.0
    assert float(layer.gate.tokens_per_expert_E.sum()) == 0.0 and float(layer.gate.dropped_tokens) == 0.0
