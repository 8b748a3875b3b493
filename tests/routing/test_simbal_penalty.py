"""Issue 25's SimBal options: ``penalty: squared`` and the loss-free bias on the softmax gate.

Every expected number is worked out by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.balancing.base import Load
from moe_dist.balancing.simbal import SimBalLoss, SimBalLossConfig, simbal_loss
from moe_dist.routing.base import Routing
from moe_dist.routing.topk_softmax import TopKSoftmaxConfig, TopKSoftmaxRouter

# W = [[2, 0], [1, 1]]: W W^T = [[4, 2], [2, 2]], D = W W^T - I = [[3, 2], [2, 1]].
W_HAND = [[2.0, 0.0], [1.0, 1.0]]


def _value_and_grad(penalty: str, reduction: str = "sum") -> tuple[float, torch.Tensor]:
    w = torch.tensor(W_HAND, requires_grad=True)
    loss = simbal_loss(w, reduction, penalty)
    loss.backward()
    assert w.grad is not None
    return loss.item(), w.grad


def test_squared_penalty_value_and_gradient_by_hand() -> None:
    # sum D^2 = 9 + 4 + 4 + 1 = 18; mean over the 4 entries 4.5.
    # d/dW sum D^2 = 4 D W (D symmetric) = 4 [[3*2 + 2*1, 3*0 + 2*1], [2*2 + 1*1, 2*0 + 1*1]]
    #            = 4 [[8, 2], [5, 1]] = [[32, 8], [20, 4]].
    value, grad = _value_and_grad("squared")
    assert value == pytest.approx(18.0)
    assert torch.allclose(grad, torch.tensor([[32.0, 8.0], [20.0, 4.0]]))
    value, grad = _value_and_grad("squared", "mean")
    assert value == pytest.approx(4.5)
    assert torch.allclose(grad, torch.tensor([[8.0, 2.0], [5.0, 1.0]]))


def test_l1_penalty_unchanged_value_and_gradient_by_hand() -> None:
    # sum |D| = 3 + 2 + 2 + 1 = 8; the subgradient is (S + S^T) W with S = sign(D) = all ones:
    # 2 [[1, 1], [1, 1]] [[2, 0], [1, 1]] = 2 [[3, 1], [3, 1]] = [[6, 2], [6, 2]].
    value, grad = _value_and_grad("l1")
    assert value == pytest.approx(8.0)
    assert torch.allclose(grad, torch.tensor([[6.0, 2.0], [6.0, 2.0]]))
    assert SimBalLossConfig().penalty == "l1"  # the paper's Eq. 4 stays the default
    w = torch.randn(8, 16)
    assert simbal_loss(w).item() == pytest.approx(torch.norm(w @ w.T - torch.eye(8), p=1).item(), rel=1e-5)


def test_at_orthonormality_only_the_l1_gradient_stays_large() -> None:
    # The cause issue 25 tests: the L1 subgradient sign(D) does not vanish at D ~ 0 (float noise
    # picks the signs), so its norm stays 2 * ||S||_F = 2 E; the squared penalty's 4 D W -> 0.
    torch.manual_seed(0)
    E, H = 8, 16
    w0 = torch.nn.init.orthogonal_(torch.empty(E, H))
    grads = {}
    for penalty in ("l1", "squared"):
        w = w0.clone().requires_grad_(True)
        simbal_loss(w, "sum", penalty).backward()
        grads[penalty] = w.grad.norm().item()  # type: ignore[union-attr]
    assert grads["squared"] < 1e-4
    assert grads["l1"] > E  # ~2E when every sign is +-1; some entries are exactly 0


def test_squared_penalty_through_the_loss_plugin() -> None:
    router = TopKSoftmaxRouter(TopKSoftmaxConfig(top_k=2), hidden_size=2, num_experts=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor(W_HAND))
    r = router(torch.randn(3, 2))
    load = Load(counts_E=r.counts_E(), num_tokens=3, batch_size=1, seq_len=3)
    loss = SimBalLoss(SimBalLossConfig(penalty="squared"), 2, 2)
    assert loss(r, load, router).item() == pytest.approx(18.0)
    with pytest.raises(ValueError):
        SimBalLossConfig(penalty="l2")  # type: ignore[arg-type]


# ---------------------------------------------------------------- loss-free bias, softmax gate


def _router(rate: float, top_k: int = 1, renormalize: bool = False) -> TopKSoftmaxRouter:
    cfg = TopKSoftmaxConfig(top_k=top_k, renormalize=renormalize, bias_update_rate=rate)
    router = TopKSoftmaxRouter(cfg, hidden_size=3, num_experts=3)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    return router


def test_bias_selects_and_unbiased_probabilities_weight() -> None:
    # Logits = x (identity weight). x = log([0.5, 0.3, 0.2]) -> probs [0.5, 0.3, 0.2].
    x = torch.tensor([[0.5, 0.3, 0.2]]).log()
    router = _router(0.001)
    r0 = router(x)
    assert r0.experts_TK.tolist() == [[0]] and r0.weights_TK.item() == pytest.approx(0.5)
    # bias [0, 0, 0.4]: choice = [0.5, 0.3, 0.6] -> expert 2, weighted by its unbiased 0.2.
    router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.4]))
    r = router(x)
    assert r.experts_TK.tolist() == [[2]] and r.weights_TK.item() == pytest.approx(0.2)
    assert torch.allclose(r.probs_TE, torch.tensor([[0.5, 0.3, 0.2]]))  # the losses see no bias
    # top-2 with renormalisation: choice [0.5, 0.3, 0.6] -> experts {2, 0}, weights 0.2/0.7, 0.5/0.7.
    router2 = _router(0.001, top_k=2, renormalize=True)
    router2.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.4]))
    r2 = router2(x)
    assert r2.experts_TK.tolist() == [[2, 0]]
    assert torch.allclose(r2.weights_TK, torch.tensor([[0.2 / 0.7, 0.5 / 0.7]]))
    # The weight's gradient flows through the probabilities; the bias is a buffer (no gradient).
    r2.weights_TK.sum().backward()
    assert router2.weight.grad is not None and not router2.expert_bias_E.requires_grad


def test_bias_update_by_hand_and_zero_rate_is_the_plain_router() -> None:
    router = _router(0.01)
    # counts [3, 1, 2], mean 2 -> sign(mean - c) = [-1, +1, 0] -> bias [-0.01, +0.01, 0].
    router.after_step(torch.tensor([3.0, 1.0, 2.0]))
    assert torch.allclose(router.expert_bias_E, torch.tensor([-0.01, 0.01, 0.0]))
    router.after_step(torch.zeros(3))  # a step without tokens changes nothing
    assert torch.allclose(router.expert_bias_E, torch.tensor([-0.01, 0.01, 0.0]))
    # rate 0 (default): no buffer, so a plain router's checkpoint keys are unchanged, and the
    # routing equals the biased router's with a zero bias.
    plain, biased = _router(0.0, top_k=2), _router(0.5, top_k=2)
    assert "expert_bias_E" not in plain.state_dict() and "expert_bias_E" in biased.state_dict()
    plain.after_step(torch.tensor([3.0, 1.0, 2.0]))  # no-op, no error
    x = torch.randn(16, 3)
    a, b = plain(x), biased(x)
    assert torch.equal(a.experts_TK, b.experts_TK) and torch.equal(a.weights_TK, b.weights_TK)


def test_bias_is_saved_and_restored() -> None:
    router = _router(0.01)
    router.after_step(torch.tensor([3.0, 1.0, 2.0]))
    again = _router(0.01)
    again.load_state_dict(router.state_dict())
    assert torch.equal(again.expert_bias_E, router.expert_bias_E)
    assert isinstance(router(torch.randn(2, 3)), Routing)
