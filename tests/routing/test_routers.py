"""Routers: exact small cases, config checks, bias/EMA state handling, LPR against its formulas.

Shape legend: T tokens, H hidden size, E experts, K slots per token, D latent size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import ConfigError, config_from_dict
from moe_dist.registry import ROUTERS
from moe_dist.routing.expert_choice import ExpertChoiceConfig, ExpertChoiceRouter, expert_capacity
from moe_dist.routing.lpr import LPRConfig, LPRRouter, diversity, gaussian_kl
from moe_dist.routing.topk_sigmoid_bias import TopKSigmoidBiasConfig, TopKSigmoidBiasRouter
from moe_dist.routing.topk_softmax import TopKSoftmaxConfig, TopKSoftmaxRouter


@pytest.fixture(autouse=True)
def _seed_one_thread() -> Iterator[None]:
    torch.manual_seed(1234)  # every test sees the same random data, whatever ran before it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors (gradcheck): one thread is fastest on a busy machine
    yield
    torch.set_num_threads(threads)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_all_routers_registered() -> None:
    assert {"topk_softmax", "topk_sigmoid_bias", "lpr", "expert_choice"} <= set(ROUTERS.names())


# ---------------------------------------------------------------- softmax top-k


def test_topk_softmax_top1_renormalize_rejected() -> None:
    errs = TopKSoftmaxRouter.validate_config(TopKSoftmaxConfig(top_k=1), 8, 4)
    assert len(errs) == 1 and errs[0].startswith("renormalize: must be false when top_k is 1")
    assert TopKSoftmaxRouter.validate_config(TopKSoftmaxConfig(top_k=1, renormalize=False), 8, 4) == []
    r = TopKSoftmaxRouter(TopKSoftmaxConfig(top_k=1, renormalize=False), 8, 4)
    out = r(torch.randn(5, 8))
    assert torch.allclose(out.weights_TK[:, 0], out.probs_TE.max(dim=-1).values)


# ---------------------------------------------------------------- DeepSeek-V3 sigmoid + bias


def sigmoid_router(scores: list[float], **kw: object) -> tuple[TopKSigmoidBiasRouter, torch.Tensor]:
    """A router whose logits for the input ``ones(1, E)`` are logit(scores) (W = diag)."""
    E = len(scores)
    r = TopKSigmoidBiasRouter(TopKSigmoidBiasConfig(**kw), hidden_size=E, num_experts=E)  # type: ignore[arg-type]
    with torch.no_grad():
        r.weight.copy_(torch.diag(torch.tensor([logit(s) for s in scores])))
    return r, torch.ones(1, E)


def test_sigmoid_weights_are_unbiased_renormalised_scores() -> None:
    r, x = sigmoid_router([0.9, 0.2, 0.6, 0.5], top_k=2, routed_scaling_factor=2.5)
    out = r(x)
    assert sorted(out.experts_TK[0].tolist()) == [0, 2]
    w = dict(zip(out.experts_TK[0].tolist(), out.weights_TK[0].tolist()))
    assert w[0] == pytest.approx(2.5 * 0.9 / 1.5) and w[2] == pytest.approx(2.5 * 0.6 / 1.5)
    assert out.probs_TE[0].tolist() == pytest.approx([0.9 / 2.2, 0.2 / 2.2, 0.6 / 2.2, 0.5 / 2.2])
    # The bias changes the choice only: expert 1 becomes selected, its weight is its raw score 0.2.
    r.expert_bias_E.copy_(torch.tensor([0.0, 0.8, 0.0, 0.0]))
    out = r(x)
    assert sorted(out.experts_TK[0].tolist()) == [0, 1]
    w = dict(zip(out.experts_TK[0].tolist(), out.weights_TK[0].tolist()))
    assert w[1] == pytest.approx(2.5 * 0.2 / 1.1) and w[0] == pytest.approx(2.5 * 0.9 / 1.1)
    r2, _ = sigmoid_router([0.9, 0.2, 0.6, 0.5], top_k=2, renormalize=False)
    assert sorted(r2(x).weights_TK[0].tolist()) == pytest.approx([0.6, 0.9])


def test_sigmoid_group_limited_routing() -> None:
    # Groups {0,1}: top-2 sum 0.9 + 0.1 = 1.0; {2,3}: 0.6 + 0.5 = 1.1 -> only group 1 is kept,
    # so the best expert overall (0) is NOT selected.
    r, x = sigmoid_router([0.9, 0.1, 0.6, 0.5], top_k=2, n_group=2, topk_group=1)
    assert sorted(r(x).experts_TK[0].tolist()) == [2, 3]
    r, x = sigmoid_router([0.9, 0.1, 0.6, 0.5], top_k=2, n_group=2, topk_group=2)
    assert sorted(r(x).experts_TK[0].tolist()) == [0, 2]


def test_sigmoid_config_checks() -> None:
    def errs(**kw: object) -> list[str]:
        return TopKSigmoidBiasRouter.validate_config(TopKSigmoidBiasConfig(**kw), 16, 8)  # type: ignore[arg-type]

    assert errs(top_k=2, n_group=4, topk_group=2) == []
    assert errs(n_group=3, topk_group=1) == ["n_group: must divide num_experts (8), got 3"]
    assert errs(n_group=2, topk_group=4) == ["topk_group: must be <= n_group (2), got 4"]
    assert errs(top_k=3, n_group=4, topk_group=1)[0].startswith(
        "top_k: must be <= topk_group * num_experts / n_group (2)"
    )
    assert errs(top_k=9) == ["top_k: must be <= num_experts (8), got 9"]
    assert errs(top_k=1)[0].startswith("renormalize: must be false when top_k is 1")
    assert errs(top_k=1, renormalize=False) == []


def test_sigmoid_bias_update_rule_and_state() -> None:
    r = TopKSigmoidBiasRouter(TopKSigmoidBiasConfig(bias_update_rate=0.01), 8, 4)
    r.after_step(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5: over, under, under, under
    assert r.expert_bias_E.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    r.after_step(torch.tensor([5.0, 5.0, 3.0, 7.0]))
    assert r.expert_bias_E.tolist() == pytest.approx([-0.01, 0.01, 0.02, 0.0])
    before = r.expert_bias_E.clone()
    r.after_step(torch.zeros(4))  # a step without tokens changes nothing
    assert torch.equal(r.expert_bias_E, before)
    # A buffer: in the state dict (checkpoints), not a parameter (no gradient, no optimizer).
    assert "expert_bias_E" in r.state_dict() and all(p is not r.expert_bias_E for p in r.parameters())
    # Evaluation forwards leave it alone.
    r.eval()
    r(torch.randn(16, 8))
    assert torch.equal(r.expert_bias_E, before)
    frozen = TopKSigmoidBiasRouter(TopKSigmoidBiasConfig(bias_update_rate=0.0), 8, 4)
    frozen.after_step(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    assert frozen.expert_bias_E.abs().sum() == 0


def test_sigmoid_default_rate() -> None:
    assert TopKSigmoidBiasConfig().bias_update_rate == 0.001


# ---------------------------------------------------------------- expert choice


def test_expert_choice_hand_computed() -> None:
    # E=2, T=4, c=1 -> C = ceil(4 * 1 / 2) = 2 tokens per expert. W = I, so probs = softmax(x).
    r = ExpertChoiceRouter(ExpertChoiceConfig(capacity_factor=1.0), hidden_size=2, num_experts=2)
    with torch.no_grad():
        r.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.5], [0.0, 3.0]])
    out = r(x)
    # expert 0 scores: sigmoid(2), sigmoid(1), sigmoid(-.5), sigmoid(-3) -> tokens 0, 1
    # expert 1 scores: the complements -> tokens 3, 2
    assert out.experts_TK.tolist() == [[0, -1], [0, -1], [-1, 1], [-1, 1]]
    p = torch.softmax(x, dim=-1)
    assert torch.allclose(out.weights_TK, p * (out.experts_TK >= 0))
    assert out.counts_E().tolist() == [2.0, 2.0]


def test_expert_choice_capacity_and_balance() -> None:
    assert (
        expert_capacity(10, 2.0, 4) == 5
        and expert_capacity(10, 1.0, 4) == 3
        and expert_capacity(3, 8.0, 2) == 3
    )
    r = ExpertChoiceRouter(ExpertChoiceConfig(), hidden_size=8, num_experts=4)
    out = r(torch.randn(10, 8))
    assert out.experts_TK.shape == (10, 4)
    assert out.counts_E().tolist() == [5.0] * 4  # perfectly balanced by construction
    for t in range(10):  # slot e holds expert e or -1; slots of a token are distinct
        assert all(v in (e, -1) for e, v in enumerate(out.experts_TK[t].tolist()))
    assert ExpertChoiceRouter.validate_config(ExpertChoiceConfig(top_k=99), 8, 4) == []


def test_expert_choice_depends_on_the_batch() -> None:
    """The documented causality caveat: a token's experts depend on the other tokens."""
    r = ExpertChoiceRouter(ExpertChoiceConfig(capacity_factor=1.0), hidden_size=2, num_experts=2)
    with torch.no_grad():
        r.weight.copy_(torch.eye(2))
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    # Alone (T=1, C=1) both experts take token a; beside b, expert 0 prefers b and a keeps only expert 1.
    assert r(a).experts_TK.tolist() == [[0, 1]]
    assert r(torch.cat([a, b])).experts_TK.tolist() == [[-1, 1], [0, -1]]


# ---------------------------------------------------------------- LPR


def lpr(**kw: object) -> LPRRouter:
    torch.manual_seed(0)
    return LPRRouter(LPRConfig(top_k=2, **kw), hidden_size=12, num_experts=6)  # type: ignore[arg-type]


def test_lpr_defaults_match_official_qwen3_config() -> None:
    c = LPRConfig()
    assert (c.latent_dim, c.diversity_type, c.diversity_lambda, c.div_weight) == (16, "orthogonal", 1.0, 1.0)
    assert (c.kl_weight, c.align_weight, c.loss_coef, c.ema_decay, c.ema_keys) == (
        0.01,
        0.1,
        0.01,
        0.8,
        False,
    )
    assert c.add_decoded_latent and not c.unit_ball_init
    r = LPRRouter(c, 32, 8)
    assert r.weight_EH is None and r.expert_keys.shape == (8, 16)
    assert not torch.allclose(r.expert_keys.norm(dim=-1), torch.ones(8))  # randn keys, not normalised


def test_lpr_forward_against_formulas() -> None:
    r = lpr().eval()
    x = torch.randn(7, 12)
    out = r(x)
    h = F.silu(F.layer_norm(x, (12,), r.norm.weight, r.norm.bias))
    mu, logvar = (h @ r.encoder.weight.T + r.encoder.bias).chunk(2, dim=-1)
    keys = r.expert_keys
    cos = (mu / mu.norm(dim=-1, keepdim=True)) @ (keys / keys.norm(dim=-1, keepdim=True)).T
    vals, idx = cos.topk(2, dim=-1)
    assert torch.equal(out.experts_TK, idx)
    assert torch.allclose(out.weights_TK, vals.softmax(-1), atol=1e-6)
    assert torch.allclose(out.probs_TE, cos.softmax(-1), atol=1e-6)
    assert out.logits_TE is None
    delta = (cos.softmax(-1) @ keys) @ r.out_proj.weight.T + r.out_proj.bias
    assert torch.allclose(out.expert_input_delta_TH, delta, atol=1e-5)

    # Regularisers, each times its weight and the model-level 0.01 (eval: z = mu).
    def d(v: torch.Tensor) -> torch.Tensor:
        n = v / v.norm(dim=-1, keepdim=True)
        return ((n @ n.T - torch.eye(v.shape[0])) ** 2).mean()

    kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1)).mean()
    w = torch.zeros(7, 6).scatter(1, idx, vals).softmax(-1)  # non-top-k experts get e^0
    align = (keys - w.T @ mu).abs().mean()
    assert out.losses["lpr_diversity"].item() == pytest.approx(
        0.01 * 1.0 * (d(mu) + d(keys)).item(), rel=1e-5
    )
    assert out.losses["lpr_kl"].item() == pytest.approx(0.01 * 0.01 * kl.item(), rel=1e-5)
    assert out.losses["lpr_align"].item() == pytest.approx(0.01 * 0.1 * align.item(), rel=1e-5)
    assert set(out.losses) == {"lpr_diversity", "lpr_kl", "lpr_align"}


def test_lpr_helpers() -> None:
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # normalised Gram off-diagonals: 0, s, s with s = 1/sqrt(2), symmetric -> 4 entries s^2 = 0.5 each
    assert diversity(v, "orthogonal").item() == pytest.approx(4 * 0.5 / 9)
    assert diversity(v, "cosine").item() == pytest.approx(4 / math.sqrt(2) / 6)
    assert diversity(v[:1], "orthogonal").item() == 0.0
    # KL of N(0, 1) is 0; of N(1, e) per dim: -0.5 (1 + 1 - 1 - e) = (e - 1) / 2
    assert gaussian_kl(torch.zeros(3, 2), torch.zeros(3, 2)).item() == 0.0
    assert gaussian_kl(torch.ones(1, 1), torch.ones(1, 1)).item() == pytest.approx((math.e - 1) / 2)


def test_lpr_training_noise_and_eval_determinism() -> None:
    r = lpr()
    x = torch.randn(5, 12)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.losses["lpr_align"], b.losses["lpr_align"])
    r.train()
    c, d = r(x), r(x)
    assert torch.equal(c.experts_TK, d.experts_TK)  # routing uses mu, not the sampled z
    assert not torch.equal(c.losses["lpr_align"], d.losses["lpr_align"])  # the align target uses z


def test_lpr_diversity_sampling() -> None:
    x = torch.randn(40, 12)
    exact = lpr(diversity_max_tokens=None).eval()(x).losses["lpr_diversity"]
    assert lpr(diversity_max_tokens=40).eval()(x).losses["lpr_diversity"].item() == pytest.approx(
        exact.item()
    )
    sampled = lpr(diversity_max_tokens=8)  # training mode: a fresh random sample each call
    vals = [sampled(x).losses["lpr_diversity"].item() for _ in range(20)]
    assert len(set(vals)) > 1
    assert abs(sum(vals) / 20 - exact.item()) < 0.25 * exact.item()
    sampled.eval()  # eval: evenly strided, reproducible
    assert sampled(x).losses["lpr_diversity"].item() == sampled(x).losses["lpr_diversity"].item()


def test_lpr_weight_temperature_sharpens_only_the_combine_weights() -> None:
    x = torch.randn(9, 12)
    flat, sharp = lpr().eval()(x), lpr(weight_temperature=0.25).eval()(x)
    assert torch.equal(sharp.experts_TK, flat.experts_TK)
    vals_TK = flat.weights_TK.log()  # the top-k cosines up to a per-token constant
    assert torch.allclose(sharp.weights_TK, (vals_TK / 0.25).softmax(-1), atol=1e-6)
    assert (sharp.weights_TK.amax(-1) > flat.weights_TK.amax(-1)).all()
    for name in flat.losses:  # the regularisers (and the alignment target) see the cosines
        assert torch.equal(sharp.losses[name], flat.losses[name]), name


def test_lpr_diversity_on_one_half() -> None:
    x = torch.randn(9, 12)
    r = lpr().eval()
    both = r(x)
    mu = r.encode(x)[1]

    def d(v: torch.Tensor) -> torch.Tensor:
        n = v / v.norm(dim=-1, keepdim=True)
        return ((n @ n.T - torch.eye(v.shape[0])) ** 2).mean()

    want = {"latents": d(mu), "keys": d(r.expert_keys)}
    for on, d_half in want.items():
        out = lpr(diversity_on=on).eval()(x)
        assert out.losses["lpr_diversity"].item() == pytest.approx(0.01 * d_half.item(), rel=1e-5), on
        for name in ("lpr_kl", "lpr_align"):  # the other terms are untouched
            assert torch.equal(out.losses[name], both.losses[name]), (on, name)
    total = sum(v.item() for v in want.values())
    assert both.losses["lpr_diversity"].item() == pytest.approx(0.01 * total, rel=1e-5)


def test_lpr_decoded_latent_option() -> None:
    assert lpr(add_decoded_latent=False)(torch.randn(3, 12)).expert_input_delta_TH is None


def test_lpr_ema_keys() -> None:
    r = lpr(ema_keys=True)
    x = torch.randn(9, 12)
    keys0 = r.expert_keys.detach().clone()
    torch.manual_seed(5)
    out = r(x)
    sums, counts = r.step_sums_ED.clone(), r.step_counts_E.clone()
    assert counts.sum().item() == pytest.approx(9.0)  # each token's weights over E sum to 1
    r.after_step(out.counts_E())
    want = (0.8 * keys0 + 0.2 * sums) / (0.2 * counts).clamp(min=1e-6).unsqueeze(1)
    assert torch.allclose(r.expert_keys, want, atol=1e-6)
    assert r.step_counts_E.sum() == 0  # consumed
    off = lpr()
    keys = off.expert_keys.detach().clone()
    off(x)
    off.after_step(torch.ones(6))
    assert torch.equal(off.expert_keys, keys)  # default: no EMA update


def test_lpr_gradcheck_float64() -> None:
    r = lpr(latent_dim=4).double().eval()
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    keys = r.expert_keys.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(r, {"expert_keys": keys}, (x,))
        assert out.weights_TK.dtype == torch.float64
        total = (out.weights_TK * torch.arange(1.0, 3.0, dtype=torch.float64)).sum()
        total = total + (out.probs_TE**2).sum() + out.expert_input_delta_TH.sum()
        return total + sum(out.losses.values())

    assert torch.autograd.gradcheck(f, (x, keys))


def test_yaml_names_select_routers() -> None:
    for name, extra in [
        ("topk_softmax", {}),
        ("topk_sigmoid_bias", {"n_group": 2, "topk_group": 1}),
        ("lpr", {"latent_dim": 8}),
        ("expert_choice", {"capacity_factor": 1.5}),
    ]:
        cfg = config_from_dict(
            {"model": {"dim": 16, "moe": {"num_experts": 4, "router": {"name": name, **extra}}}}
        )
        assert isinstance(cfg.model.moe.router, ROUTERS.get(name).Config)
        assert cfg.model.moe.router.name == name
    with pytest.raises(ConfigError, match="model.moe.router.n_group: must divide num_experts"):
        config_from_dict(
            {
                "model": {
                    "dim": 16,
                    "moe": {"num_experts": 4, "router": {"name": "topk_sigmoid_bias", "n_group": 3}},
                }
            }
        )
    with pytest.raises(ConfigError, match="model.moe.router.latent_dimm: unknown key"):
        config_from_dict({"model": {"moe": {"router": {"name": "lpr", "latent_dimm": 8}}}})


@pytest.mark.parametrize("name", ["topk_softmax", "topk_sigmoid_bias", "lpr", "expert_choice"])
def test_routing_is_fp32_inside_bf16_autocast(name: str) -> None:
    cls = ROUTERS.get(name)
    r = cls(cls.Config(top_k=2), 16, 4).eval()
    x = torch.randn(6, 16)
    ref = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(x)
    assert got.probs_TE.dtype == torch.float32 and torch.equal(got.probs_TE, ref.probs_TE)
    assert torch.equal(got.experts_TK, ref.experts_TK) and torch.equal(got.weights_TK, ref.weights_TK)
    if name == "lpr":
        assert r(x.bfloat16()).expert_input_delta_TH.dtype == torch.bfloat16  # back in the input's dtype


def test_fp32_gate_keeps_its_input_in_its_own_dtype() -> None:
    """bf16 tokens: fp32 logits and the same gradients as autograd's ``linear(x.float(), w)``,
    but what is kept for the backward is the bf16 input, not an fp32 copy of it."""
    from moe_dist.activation_memory import saved_for_backward

    router = TopKSoftmaxRouter(TopKSoftmaxConfig(top_k=2), 16, 4)
    x = torch.randn(32, 16).to(torch.bfloat16).requires_grad_()
    kept, logits = saved_for_backward(lambda: router.gate_logits(x), [x, router.weight])
    assert logits.dtype == torch.float32 and kept == 0  # only x and the weight themselves
    g = torch.randn(32, 4)
    logits.backward(g)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = router.weight.detach().clone().requires_grad_()
    ref = F.linear(x_ref.float(), w_ref)
    ref.backward(g)
    assert torch.equal(logits, ref)
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, x_ref.grad)
    assert torch.equal(router.weight.grad, w_ref.grad)
