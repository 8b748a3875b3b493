"""Balancing losses: hand-computed values on tiny tensors, float64 gradchecks, config checks.

Shape legend: T tokens, E experts, K slots per token, B sequences, S tokens per sequence.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from moe_dist.balancing.base import Load
from moe_dist.balancing.global_batch import GlobalBatchLoss, GlobalBatchLossConfig
from moe_dist.balancing.seq_aux import SeqAuxLoss, SeqAuxLossConfig, sequence_counts
from moe_dist.balancing.simbal import SimBalLoss, SimBalLossConfig, simbal_loss
from moe_dist.balancing.switch import SwitchLoss, SwitchLossConfig
from moe_dist.balancing.z_loss import ZLoss, ZLossConfig, z_loss
from moe_dist.config import ConfigError, config_from_dict
from moe_dist.registry import LOSSES, ROUTERS
from moe_dist.routing.base import Routing
from moe_dist.routing.topk_softmax import TopKSoftmaxConfig, TopKSoftmaxRouter

ROUTER = TopKSoftmaxRouter(TopKSoftmaxConfig(top_k=1, renormalize=False), hidden_size=2, num_experts=2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)  # every test sees the same random data, whatever ran before it


def routing(probs_TE: list[list[float]], experts_TK: list[list[int]], **kw: torch.Tensor) -> Routing:
    probs = torch.tensor(probs_TE, dtype=torch.float64)
    experts = torch.tensor(experts_TK, dtype=torch.int64)
    return Routing(
        experts_TK=experts, weights_TK=torch.zeros(experts.shape, dtype=torch.float64), probs_TE=probs, **kw
    )


def load_of(r: Routing, B: int = 1, **kw: object) -> Load:
    T = r.probs_TE.shape[0]
    return Load(counts_E=r.counts_E(), num_tokens=T, batch_size=B, seq_len=T // B, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- switch


def test_switch_hand_computed_top1() -> None:
    # T=2, E=2, K=1: both tokens pick expert 0 -> f = [1, 0]; P = mean([.75,.25],[.5,.5]) = [.625,.375]
    # loss = E * sum f P = 2 * 0.625 = 1.25
    r = routing([[0.75, 0.25], [0.5, 0.5]], [[0], [0]])
    loss = SwitchLoss(SwitchLossConfig(), num_experts=2, top_k=1)
    assert loss(r, load_of(r), ROUTER).item() == pytest.approx(1.25)


def test_switch_hand_computed_top2_and_normalisation() -> None:
    # K=2, E=2: every token uses both experts -> counts [2, 2]; f = 2/(2*2) = [.5, .5] -> loss = 1 (uniform)
    r = routing([[0.75, 0.25], [0.5, 0.5]], [[0, 1], [0, 1]])
    by_kt = SwitchLoss(SwitchLossConfig(), num_experts=2, top_k=2)
    assert by_kt(r, load_of(r), ROUTER).item() == pytest.approx(1.0)
    # OLMoE / SimBal normalisation by T only: f = [1, 1] -> loss = 2 * (0.625 + 0.375) = 2 = K * min
    by_t = SwitchLoss(SwitchLossConfig(normalize_by_topk=False), num_experts=2, top_k=2)
    assert by_t(r, load_of(r), ROUTER).item() == pytest.approx(2.0)


def test_switch_minimum_is_one_at_uniform_routing() -> None:
    E, K, T = 4, 2, 8
    probs = torch.full((T, E), 1.0 / E)
    experts = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    r = Routing(experts_TK=experts, weights_TK=torch.zeros(T, K), probs_TE=probs)
    assert SwitchLoss(SwitchLossConfig(), E, K)(r, load_of(r), ROUTER).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- global batch


def test_global_batch_hand_computed() -> None:
    # Local T=2 (P = [.625, .375]); global counts [3, 1] over 4 tokens, K=1 -> fbar = [.75, .25]
    # loss = 2 * (.75 * .625 + .25 * .375) = 2 * 0.5625 = 1.125
    r = routing([[0.75, 0.25], [0.5, 0.5]], [[0], [0]])
    load = load_of(r, global_counts_E=torch.tensor([3.0, 1.0]), global_num_tokens=4)
    loss = GlobalBatchLoss(GlobalBatchLossConfig(), num_experts=2, top_k=1)
    assert loss(r, load, ROUTER).item() == pytest.approx(1.125)
    assert GlobalBatchLoss.needs_global_counts


def test_global_batch_equals_switch_when_global_is_local() -> None:
    r = routing([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9]], [[0], [0], [1]])
    load = load_of(r)
    load.global_counts_E, load.global_num_tokens = load.counts_E, load.num_tokens
    g = GlobalBatchLoss(GlobalBatchLossConfig(), 2, 1)(r, load, ROUTER)
    s = SwitchLoss(SwitchLossConfig(), 2, 1)(r, load, ROUTER)
    assert g.item() == pytest.approx(s.item())


def test_global_batch_without_global_counts_is_a_clear_error() -> None:
    r = routing([[0.75, 0.25]], [[0]])
    with pytest.raises(RuntimeError, match="global_counts_E is missing"):
        GlobalBatchLoss(GlobalBatchLossConfig(), 2, 1)(r, load_of(r), ROUTER)


# ---------------------------------------------------------------- sequence-wise (DeepSeek-V3)


def test_seq_aux_hand_computed() -> None:
    # B=2 sequences of S=2 tokens, E=2, K=1.
    # seq 0: experts [0, 0] -> f = E/(K*S) * [2, 0] = [2, 0]; P = mean([.8,.2],[.6,.4]) = [.7,.3] -> 1.4
    # seq 1: experts [0, 1] -> f = [1, 1];                 P = mean([.5,.5],[.3,.7]) = [.4,.6] -> 1.0
    # loss = mean(1.4, 1.0) = 1.2
    r = routing([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5], [0.3, 0.7]], [[0], [0], [0], [1]])
    loss = SeqAuxLoss(SeqAuxLossConfig(), num_experts=2, top_k=1)
    assert loss(r, load_of(r, B=2), ROUTER).item() == pytest.approx(1.2)
    # The same 4 tokens as ONE sequence: f = 2/4 * [3, 1] = [1.5, .5]; P = [.55, .45] -> 1.05
    assert loss(r, load_of(r, B=1), ROUTER).item() == pytest.approx(1.05)


def test_seq_aux_skips_unused_slots_and_checks_shape() -> None:
    counts = sequence_counts(torch.tensor([[0, -1], [1, -1], [-1, -1], [1, 0]]), batch_size=2, num_experts=2)
    assert counts.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    r = routing([[0.5, 0.5]] * 4, [[0]] * 4)
    bad = Load(counts_E=r.counts_E(), num_tokens=4, batch_size=3, seq_len=2)
    with pytest.raises(ValueError, match="batch_size \\* seq_len"):
        SeqAuxLoss(SeqAuxLossConfig(), 2, 1)(r, bad, ROUTER)


# ---------------------------------------------------------------- z-loss


def test_z_loss_hand_computed() -> None:
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    r = routing([[0.5, 0.5], [0.75, 0.25]], [[0], [0]], logits_TE=logits)
    got = ZLoss(ZLossConfig(), 2, 1)(r, load_of(r), ROUTER)
    assert got.item() == pytest.approx(2.5 * math.log(2.0) ** 2)


def test_z_loss_without_logits_is_rejected() -> None:
    errors = ZLoss.validate_config(ZLossConfig(), ROUTERS.get("lpr"), 4)
    assert len(errors) == 1 and "needs router logits" in errors[0] and "'lpr'" in errors[0]
    assert ZLoss.validate_config(ZLossConfig(), ROUTERS.get("topk_softmax"), 4) == []
    r = routing([[0.5, 0.5]], [[0]])
    with pytest.raises(ValueError, match="no logits_TE"):
        ZLoss(ZLossConfig(), 2, 1)(r, load_of(r), ROUTER)


# ---------------------------------------------------------------- SimBal


def test_simbal_hand_computed() -> None:
    # R = [[1, 0], [1, 1]]: R R^T = [[1, 1], [1, 2]]; minus I = [[0, 1], [1, 1]] -> L1 sum 3, mean 3/4
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert simbal_loss(w).item() == pytest.approx(3.0)
    assert simbal_loss(w, "mean").item() == pytest.approx(0.75)
    # Raw weights, rows not normalised: 2 * I gives |4 - 1| * 2 = 6 although the rows are orthogonal.
    assert simbal_loss(2.0 * torch.eye(2)).item() == pytest.approx(6.0)
    # The paper's reference code: torch.norm(w @ w.T - eye, p=1) on the flattened matrix.
    w = torch.randn(8, 16)
    assert simbal_loss(w).item() == pytest.approx(torch.norm(w @ w.T - torch.eye(8), p=1).item(), rel=1e-5)


def test_simbal_zero_on_orthogonal_router_and_uses_router_weight() -> None:
    router = TopKSoftmaxRouter(TopKSoftmaxConfig(init="orthogonal"), hidden_size=16, num_experts=8)
    loss = SimBalLoss(SimBalLossConfig(), 8, 2)
    r = router(torch.randn(3, 16))
    assert loss(r, load_of(r), router).item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]).repeat(4, 8))
    assert loss(r, load_of(r), router).item() == pytest.approx(simbal_loss(router.weight).item())


def test_simbal_config_checks() -> None:
    errors = SimBalLoss.validate_config(SimBalLossConfig(), ROUTERS.get("lpr"), 8)
    assert len(errors) == 1 and "'lpr' has none" in errors[0]
    for name in ("topk_softmax", "topk_sigmoid_bias", "expert_choice"):
        assert SimBalLoss.validate_config(SimBalLossConfig(), ROUTERS.get(name), 8) == []
    assert SimBalLossConfig().coef == 0.1 and SimBalLossConfig().reduction == "sum"
    # H < E: rows cannot be orthonormal -> one warning at the first call
    router = TopKSoftmaxRouter(TopKSoftmaxConfig(), hidden_size=4, num_experts=8)
    loss = SimBalLoss(SimBalLossConfig(), 8, 2)
    r = router(torch.randn(2, 4))
    with pytest.warns(UserWarning, match="hidden size 4 < num_experts 8"):
        loss(r, load_of(r), router)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(r, load_of(r), router)


def test_config_errors_name_the_place() -> None:
    base = {"model": {"dim": 16, "moe": {"num_experts": 4}}}
    base["model"]["moe"].update(
        router={"name": "lpr", "top_k": 2}, losses=[{"name": "simbal"}, {"name": "z_loss"}]
    )
    with pytest.raises(ConfigError) as info:
        config_from_dict(base)
    text = str(info.value)
    assert "model.moe.losses.0.name: simbal regularises" in text
    assert "model.moe.losses.1.name: z_loss needs router logits" in text
    bad = {
        "model": {
            "dim": 16,
            "moe": {
                "num_experts": 4,
                "router": {"name": "expert_choice"},
                "losses": [{"name": "switch"}, {"name": "global_batch"}],
            },
        }
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad)
    assert "losses.0.name: switch is constant with router 'expert_choice'" in str(info.value)
    assert "losses.1.name: global_batch is constant" in str(info.value)
    with pytest.raises(ConfigError, match="losses.0.reduction"):
        config_from_dict({"model": {"dim": 16, "moe": {"losses": [{"name": "simbal", "reduction": "max"}]}}})


def test_every_loss_is_registered() -> None:
    assert {"switch", "global_batch", "seq_aux", "z_loss", "simbal"} <= set(LOSSES.names())


# ---------------------------------------------------------------- gradients (float64)


def test_gradcheck_probability_losses() -> None:
    torch.manual_seed(0)
    B, S, E, K = 2, 3, 4, 2
    logits = torch.randn(B * S, E, dtype=torch.float64, requires_grad=True)
    experts = logits.detach().topk(K, dim=-1).indices
    counts = torch.bincount(experts.reshape(-1), minlength=E).to(torch.float64)
    load = Load(
        counts_E=counts,
        num_tokens=B * S,
        batch_size=B,
        seq_len=S,
        global_counts_E=counts * 3 + 1,
        global_num_tokens=3 * B * S + 1,
    )
    for loss in (
        SwitchLoss(SwitchLossConfig(), E, K),
        GlobalBatchLoss(GlobalBatchLossConfig(), E, K),
        SeqAuxLoss(SeqAuxLossConfig(), E, K),
    ):

        def f(lg: torch.Tensor, loss=loss) -> torch.Tensor:
            r = Routing(
                experts_TK=experts, weights_TK=torch.zeros(B * S, K, dtype=lg.dtype), probs_TE=lg.softmax(-1)
            )
            return loss(r, load, ROUTER)

        assert f(logits).dtype == torch.float64
        assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradcheck(z_loss, (logits,))


def test_gradcheck_simbal() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # no entry of R R^T - I at 0
    assert torch.autograd.gradcheck(simbal_loss, (w,))
    assert torch.autograd.gradcheck(lambda v: simbal_loss(v, "mean"), (w,))
