"""Gate: loss names, the sequence-first reorder, statistics in training only, the EP check, and
finish_step over native layers and foreign-dispatcher gates alike (kept -> received over EP).

Shape legend: B batch, S sequence, T tokens, H hidden, E experts, e local experts.
"""

from __future__ import annotations

import pytest
import torch
from rank_processes import run_on_ranks
from torch import nn

from moe_dist.config import ConfigError, MoEConfig
from moe_dist.layers.gate import Gate
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.step_hook import finish_step

H, E = 8, 4


def _cfg(losses: list[dict] | None = None, top_k: int = 2) -> MoEConfig:
    return MoEConfig(
        num_experts=E,
        router={"name": "topk_softmax", "top_k": top_k},
        losses=losses if losses is not None else [{"name": "switch", "coef": 0.01}],
        experts={"ffn_hidden_size": 8},
    )


class Foreign(nn.Module):
    """What an adapter is to ``finish_step``: something holding a gate whose dispatcher is not ours."""

    def __init__(self, ep_size: int = 1) -> None:
        super().__init__()
        self.gate = Gate(_cfg(), H, ep_size=ep_size, kept_counts=True)


def test_a_loss_configured_twice_is_logged_under_suffixed_names() -> None:
    losses = [
        {"name": "switch", "coef": 0.01},
        {"name": "z_loss", "coef": 0.001},
        {"name": "switch", "coef": 0.1},
    ]
    gate = Gate(_cfg(losses), H)
    assert gate.loss_names == ["switch", "z_loss", "switch_1"]
    _, aux = gate(torch.randn(6, H), 1, 6)
    assert set(aux) == {"switch", "z_loss", "switch_1"}
    torch.testing.assert_close(aux["switch_1"], 10 * aux["switch"])  # same loss, 10x the coefficient


def test_sequence_first_tokens_route_and_lose_as_batch_first_ones() -> None:
    """Megatron's [S, B, H]: the losses see whole sequences, the routing comes back in [S, B] order."""
    cfg = _cfg([{"name": "seq_aux", "coef": 0.1}])
    torch.manual_seed(0)
    batch_first = Gate(cfg, H)
    seq_first = Gate(cfg, H, sequence_first=True)
    seq_first.load_state_dict(batch_first.state_dict())
    B, S = 3, 5
    x_BSH = torch.randn(B, S, H)
    want, want_aux = batch_first(x_BSH.reshape(-1, H), B, S)
    got, got_aux = seq_first(x_BSH.transpose(0, 1).reshape(-1, H), B, S)
    order = torch.arange(B * S).view(B, S).t().reshape(-1)  # sequence-first row -> batch-first row
    assert torch.equal(got.experts_TK, want.experts_TK[order])
    torch.testing.assert_close(got.weights_TK, want.weights_TK[order])
    torch.testing.assert_close(got_aux["seq_aux"], want_aux["seq_aux"])
    # the same tokens read batch-first give another value: the reorder matters
    _, other = batch_first(x_BSH.transpose(0, 1).reshape(-1, H), B, S)
    assert abs(float(other["seq_aux"].detach()) - float(want_aux["seq_aux"].detach())) > 1e-6
    with pytest.raises(ValueError, match=r"batch_size \* seq_len \(3 \* 4\) != tokens \(15\)"):
        seq_first(x_BSH.reshape(-1, H), B, 4)


def test_statistics_only_in_training_and_reset() -> None:
    gate = Foreign().gate
    x_TH = torch.randn(6, H)
    gate.eval()
    gate(x_TH, 1, 6)
    gate.record_kept(torch.ones(E), 2)
    assert float(gate.tokens_per_expert_E.sum()) == 0 and gate.last_aux == {}
    assert float(gate.kept_per_expert_E.sum()) == 0 and float(gate.dropped_tokens) == 0
    gate.train()
    gate(x_TH, 1, 6)
    gate.record_kept(torch.ones(E), 2)
    assert float(gate.tokens_per_expert_E.sum()) == 6 * 2 and set(gate.last_aux) == {"switch"}
    assert gate.kept_per_expert_E.tolist() == [1.0] * E and float(gate.dropped_tokens) == 2
    gate.reset_stats()
    assert float(gate.tokens_per_expert_E.sum() + gate.kept_per_expert_E.sum() + gate.dropped_tokens) == 0
    assert set(gate.last_aux) == {"switch"}  # the last values stay for telemetry
    with pytest.raises(RuntimeError, match="kept_counts=True"):
        Gate(_cfg(), H).record_kept(torch.ones(E), 0)


def test_config_errors_name_their_place() -> None:
    with pytest.raises(
        ConfigError, match=r"moe.num_experts: must be divisible by the expert-parallel size \(3\), got 4"
    ):
        Gate(_cfg(), H, ep_size=3)
    gate = Gate(_cfg(), H, ep_size=2)
    assert gate.received_per_local_expert_e.numel() == 2
    gate.set_ep_size(4)
    assert gate.num_local_experts == 1 and gate.received_per_local_expert_e.numel() == 1
    with pytest.raises(ConfigError, match="expert-parallel size"):
        gate.set_ep_size(3)
    with pytest.raises(ConfigError, match="moe.router.top_k"):
        Gate(_cfg(top_k=E + 1), H)


def test_finish_step_takes_native_layers_and_foreign_gates_alike() -> None:
    torch.manual_seed(0)
    native, foreign = MoELayer(_cfg(), H), Foreign()
    x_TH = torch.randn(6, H)
    native(x_TH)
    routing, _ = foreign.gate(x_TH, 1, 6)
    kept_E = routing.counts_E() - torch.tensor([1.0, 0.0, 0.0, 0.0])
    foreign.gate.record_kept(kept_E, 1)
    counts = finish_step([native, foreign], ParallelGroups.single())
    assert len(counts.counts_E) == len(counts.received_E) == len(counts.dropped) == 2
    torch.testing.assert_close(counts.received_E[0], counts.counts_E[0])  # dropless native layer
    torch.testing.assert_close(counts.received_E[1], kept_E)  # the foreign gate's kept slots
    assert float(counts.dropped[1]) == 1 and float(counts.local_received[1]) == float(kept_E.sum())
    assert counts.a2a_seconds == counts.expert_seconds == 0.0
    for gate in (native.gate, foreign.gate):
        assert float(gate.tokens_per_expert_E.sum() + gate.received_per_local_expert_e.sum()) == 0
    assert float(foreign.gate.kept_per_expert_E.sum()) == 0
    assert finish_step([], ParallelGroups.single()).counts_E == []


def _kept_body(rank: int, world: int) -> dict:
    groups = ParallelGroups.build(ep_size=2)
    foreign = Foreign(ep_size=2)
    foreign.gate.record_kept(torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1), 0)
    counts = finish_step([foreign], groups)
    return {"received_E": counts.received_E[0], "local": float(counts.local_received[0])}


@pytest.mark.slow
def test_kept_counts_become_what_each_rank_received_over_ep() -> None:
    """EP = 2: expert 0, 1 live on rank 0, experts 2, 3 on rank 1; kept slots are summed over EP."""
    results = run_on_ranks(_kept_body, 2)
    for r in results:
        assert r["received_E"].tolist() == [3.0, 6.0, 9.0, 12.0]  # both ranks' kept slots, once each
    assert (results[0]["local"], results[1]["local"]) == (9.0, 21.0)
