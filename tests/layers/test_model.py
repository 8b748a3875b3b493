"""The MoE transformer: shapes, causality, dense prefix, aux terms, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from moe_dist.config import config_from_dict
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.models import build_model


def _model_cfg(**over):
    model = {
        "dim": 32,
        "n_layers": 3,
        "n_heads": 2,
        "max_seq_len": 16,
        "dense_layers": 1,
        "dense_ffn_hidden_size": 48,
        "moe": {
            "num_experts": 4,
            "router": {"name": "topk_softmax", "top_k": 2},
            "losses": [{"name": "switch", "coef": 0.01}, {"name": "z_loss", "coef": 0.001}],
            "experts": {"ffn_hidden_size": 24},
        },
    }
    model.update(over)
    return config_from_dict({"model": model, "data": {"seq_len": 16}}).model


def test_forward_shapes_dense_prefix_and_aux_terms() -> None:
    torch.manual_seed(0)
    model = build_model(_model_cfg(), seed=1)
    tokens_BS = torch.randint(0, 256, (2, 16))
    logits_BSV, aux_loss, aux_terms = model(tokens_BS)
    assert logits_BSV.shape == (2, 16, 256)
    assert len(model.moe_layers()) == 2 and all(isinstance(m, MoELayer) for m in model.moe_layers())
    assert not model.blocks[0].is_moe and model.blocks[1].is_moe
    assert set(aux_terms) == {"switch", "z_loss"}
    # the summed aux loss is the sum of the per-term values (each already summed over layers)
    torch.testing.assert_close(aux_loss, aux_terms["switch"] + aux_terms["z_loss"])
    # Switch loss of 2 layers is about 2 * coef * 1 at a near-uniform router init
    assert 0.015 < float(aux_terms["switch"].detach()) < 0.03
    # tied embeddings: no separate output matrix
    assert model.output is None


def test_same_seed_same_weights_and_causal() -> None:
    a, b = build_model(_model_cfg(), seed=3), build_model(_model_cfg(), seed=3)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    a.eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256  # change only the future
    with torch.no_grad():
        la, _, _ = a(x)
        lb, _, _ = a(y)
    torch.testing.assert_close(la[0, :10], lb[0, :10])
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


@pytest.mark.parametrize("early_stop", [True, False])
def test_activation_checkpointing_same_grads_and_counts_once(early_stop: bool) -> None:
    """Recompute in backward must not count tokens twice; values and gradients unchanged.

    With early stop (torch's default) the recompute happens to end before the layer updates its
    statistics; without it the whole forward re-runs, and the restore is what keeps counts exact.
    """
    x = torch.randint(0, 256, (2, 16))
    results = []
    for ckpt in (False, True):
        model = build_model(_model_cfg(activation_checkpointing=ckpt), seed=5)
        model.train()
        with set_checkpoint_early_stop(early_stop):
            logits, aux, _ = model(x)
            (logits.float().logsumexp(-1).mean() + aux).backward()
        counts = [m.gate.tokens_per_expert_E.clone() for m in model.moe_layers()]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((counts, grads))
    (c0, g0), (c1, g1) = results
    for a, b in zip(c0, c1):
        assert torch.equal(a, b)
        assert float(a.sum()) == 2 * 16 * 2  # B * S * top_k, once
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-6, msg=n)


def test_untied_embeddings_have_an_output_matrix() -> None:
    model = build_model(_model_cfg(tie_embeddings=False), seed=0)
    assert model.output is not None and model.output.weight.shape == (256, 32)


def test_grouped_query_attention_equals_repeated_kv_heads() -> None:
    """n_kv_heads=1 with 2 query heads is full attention whose 2 k (and v) heads are equal copies."""
    gqa = build_model(_model_cfg(n_kv_heads=1, dense_layers=0), seed=5).eval()
    full = build_model(_model_cfg(dense_layers=0), seed=5).eval()
    gqa_sd = gqa.state_dict()
    full_sd = {k: v.clone() for k, v in gqa_sd.items() if "wqkv" not in k}
    D = 16  # head dim: 32 / 2 heads
    for name, w in gqa_sd.items():
        if "wqkv" in name:
            q, k, v = w.split([2 * D, D, D])
            full_sd[name] = torch.cat([q, k, k, v, v])
    full.load_state_dict(full_sd)
    assert gqa.blocks[0].attn.wqkv.weight.shape == (4 * D, 32)
    tokens_BS = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens_BS)[0], full(tokens_BS)[0], rtol=0, atol=1e-5)


def test_qk_norm_adds_per_head_norms_and_stays_causal() -> None:
    model = build_model(_model_cfg(qk_norm=True, n_kv_heads=1), seed=2).eval()
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= names
    assert model.blocks[0].attn.q_norm.weight.shape == (16,)
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0][:, :10], model(y)[0][:, :10])


def test_kv_cache_logits_equal_full_forward() -> None:
    from moe_dist.models.attention import KVCache

    model = build_model(_model_cfg(qk_norm=True, n_kv_heads=1), seed=4).eval()
    tokens_BS = torch.randint(0, 256, (2, 12))
    cache = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        full_BSV = model(tokens_BS)[0]
        # prefill, a chunk after cached positions, then one token at a time
        steps = [model(tokens_BS[:, :5], cache=cache)[0], model(tokens_BS[:, 5:8], cache=cache)[0]]
        steps += [model(tokens_BS[:, s : s + 1], cache=cache)[0] for s in range(8, 12)]
    assert cache[0].length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full_BSV, rtol=0, atol=1e-5)


def test_n_kv_heads_must_divide_n_heads() -> None:
    with pytest.raises(Exception, match=r"n_kv_heads.*must divide model.n_heads \(2\)"):
        _model_cfg(n_kv_heads=3)
