"""Issue 17's loss options: ``normalize: slots | tokens`` and ``scope: model`` (Hugging Face's one
loss over all layers), against hand-computed values and against transformers' own function.

Shape legend: L layers, T tokens, E experts, K slots per token, B sequences, S tokens per sequence.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.balancing.base import Load
from moe_dist.balancing.global_batch import GlobalBatchLoss, GlobalBatchLossConfig
from moe_dist.balancing.seq_aux import SeqAuxLoss, SeqAuxLossConfig
from moe_dist.balancing.switch import SwitchLoss, SwitchLossConfig
from moe_dist.config import ConfigError, ModelConfig, MoEConfig
from moe_dist.layers.gate import Gate, model_scope_losses
from moe_dist.models import build_model
from moe_dist.routing.base import Routing
from moe_dist.routing.topk_softmax import TopKSoftmaxConfig, TopKSoftmaxRouter

ROUTER = TopKSoftmaxRouter(TopKSoftmaxConfig(top_k=1, renormalize=False), hidden_size=2, num_experts=2)


def routing(probs_TE: list[list[float]], experts_TK: list[list[int]]) -> Routing:
    experts = torch.tensor(experts_TK)
    return Routing(
        experts_TK=experts,
        weights_TK=torch.zeros(experts.shape, dtype=torch.float64),
        probs_TE=torch.tensor(probs_TE, dtype=torch.float64),
    )


def load_of(r: Routing, B: int = 1) -> Load:
    T = r.probs_TE.shape[0]
    return Load(counts_E=r.counts_E(), num_tokens=T, batch_size=B, seq_len=T // B)


def test_normalize_tokens_is_k_times_slots_for_every_count_loss() -> None:
    # K=2, E=3, T=2: tokens pick {0,1} and {0,2}: counts [2,1,1];
    # P = mean([.5,.3,.2],[.4,.1,.5]) = [.45,.2,.35]; slots: f = counts/(K*T) = [.5,.25,.25]
    # -> 3 * (.225 + .05 + .0875) = 1.0875; tokens: f = counts/T -> 2.175
    r = routing([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]], [[0, 1], [0, 2]])
    slots = SwitchLoss(SwitchLossConfig(normalize="slots"), 3, 2)(r, load_of(r), ROUTER).item()
    tokens = SwitchLoss(SwitchLossConfig(normalize="tokens"), 3, 2)(r, load_of(r), ROUTER).item()
    assert slots == pytest.approx(1.0875) and tokens == pytest.approx(2.175)
    # The same for global_batch (global = local here) and seq_aux (one sequence: its f is the batch's).
    load = load_of(r)
    load.global_counts_E, load.global_num_tokens = load.counts_E, 2
    for normalize, want in (("slots", 1.0875), ("tokens", 2.175)):
        assert GlobalBatchLoss(GlobalBatchLossConfig(normalize=normalize), 3, 2)(r, load, ROUTER).item() == (
            pytest.approx(want)
        )
        assert SeqAuxLoss(SeqAuxLossConfig(normalize=normalize), 3, 2)(r, load_of(r), ROUTER).item() == (
            pytest.approx(want)
        )


def test_seq_aux_tokens_is_simbals_sequence_level_lbl() -> None:
    # SimBal's baseline: per sequence f_b = fraction of its tokens choosing each expert (sums to K),
    # P_b = mean probability, E * sum f_b P_b, mean over sequences. B=2, S=2, E=2, K=1:
    # seq 0: f [1, 0], P [.7, .3] -> 2 * .7 = 1.4; seq 1: f [.5, .5], P [.4, .6] -> 2 * .5 = 1.0; mean 1.2.
    r = routing([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5], [0.3, 0.7]], [[0], [0], [0], [1]])
    loss = SeqAuxLoss(SeqAuxLossConfig(normalize="tokens"), 2, 1)
    assert loss(r, load_of(r, B=2), ROUTER).item() == pytest.approx(1.2)


def test_legacy_normalize_by_topk_is_read_as_normalize() -> None:
    assert (
        SwitchLossConfig.model_validate({"name": "switch", "normalize_by_topk": False}).normalize == "tokens"
    )
    assert GlobalBatchLossConfig.model_validate({"normalize_by_topk": True}).normalize == "slots"
    with pytest.raises(ValueError, match="normalize"):
        SwitchLossConfig(normalize="experts")


def test_model_scope_hand_computed_over_two_layers() -> None:
    # Layer a: T=2, picks [0],[0], P = [.75, .25]; layer b: picks [1],[1], P = [.25, .75]. K=1, E=2.
    # Per-layer losses: 2 * .75 = 1.5 each (both collapsed). Model scope: counts [2, 2] over 4 rows
    # -> f = [.5, .5]; P = [.5, .5] -> 2 * (.25 + .25) = 1.0: the layer-averaged load is balanced.
    loss = SwitchLoss(SwitchLossConfig(scope="model"), 2, 1)
    ra = routing([[0.75, 0.25], [0.75, 0.25]], [[0], [0]])
    rb = routing([[0.25, 0.75], [0.25, 0.75]], [[1], [1]])
    assert loss(ra, load_of(ra), ROUTER).item() == pytest.approx(1.5)
    parts = [loss.part(ra, load_of(ra)), loss.part(rb, load_of(rb))]
    assert loss.combine(parts).item() == pytest.approx(1.0)
    tokens = SwitchLoss(SwitchLossConfig(scope="model", normalize="tokens"), 2, 1)
    assert tokens.combine(parts).item() == pytest.approx(1.0)  # K = 1: the same


def _model(scope: str, normalize: str, renormalize: bool = False) -> torch.nn.Module:
    moe = MoEConfig(
        num_experts=6,
        router={"name": "topk_softmax", "top_k": 2, "renormalize": renormalize},
        losses=[{"name": "switch", "coef": 0.5, "scope": scope, "normalize": normalize}],
        experts={"ffn_hidden_size": 16},
    )
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, max_seq_len=16, moe=moe)
    return build_model(cfg, seed=3)


def test_model_scope_equals_transformers_load_balancing_loss_func() -> None:
    """The model's ``switch`` term with scope model, tokens = 0.5 x HF's function on the router
    logits of all layers (Mixtral's and Qwen3-MoE's), value and gradient."""
    hf = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    model = _model("model", "tokens")
    logits: list[torch.Tensor] = []
    hooks = [
        layer.gate.router.register_forward_hook(lambda m, a, out: logits.append(out.logits_TE))
        for layer in model.moe_layers()
    ]
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    _, aux_loss, terms = model(tokens)
    for h in hooks:
        h.remove()
    assert len(logits) == 3
    want = 0.5 * hf.load_balancing_loss_func(tuple(logits), num_experts=6, top_k=2)
    assert terms["switch"].item() == pytest.approx(want.item(), rel=1e-6)
    assert aux_loss.item() == pytest.approx(want.item(), rel=1e-6)
    weights = [layer.gate.router.weight for layer in model.moe_layers()]
    ours = torch.autograd.grad(terms["switch"], weights, retain_graph=True)
    theirs = torch.autograd.grad(want, weights)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # And it is not the sum of per-layer losses (which the same model gives with scope layer).
    per_layer = _model("layer", "tokens")(tokens)[2]["switch"]
    assert per_layer.item() != pytest.approx(want.item(), rel=1e-3)


def test_model_scope_is_refused_where_nothing_combines_the_layers() -> None:
    moe = MoEConfig(num_experts=4, losses=[{"name": "switch", "coef": 0.01, "scope": "model"}])
    with pytest.raises(ConfigError, match="scope 'model'.*use scope: layer"):
        Gate(moe, 8)  # as the Megatron router builds it
    gate = Gate(moe, 8, model_scope=True)
    gate.train()
    routing_, aux = gate(torch.randn(6, 8), 2, 3)
    assert "switch" not in aux and "switch" in gate.last_aux  # the layer's own value, for statistics
    combined = model_scope_losses([gate])
    assert combined["switch"].item() == pytest.approx(gate.last_aux["switch"].item(), rel=1e-6)
