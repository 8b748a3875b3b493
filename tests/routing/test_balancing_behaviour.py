"""Each balancing method really balances: router-only training on a skewed synthetic stream.

Shape legend: T tokens per step, H hidden size, E experts, K slots per token.

The stream is a Gaussian mixture whose first cluster emits 80% of the tokens, so a router that
keeps similar tokens together (any untrained linear router) sends most tokens to the same few
experts. The no-balancing reference is the same router with nothing to train on (no task loss
here), i.e. its load at init. Each method then trains the router alone (Adam, cosine learning-rate
decay) on its own terms for a few hundred steps (the sigmoid-bias method with no optimizer at
all), and the Gini of the load on fresh tokens must fall well below the reference. A few seconds
in total.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moe_dist.balancing.base import Load
from moe_dist.metrics import gini, max_violation
from moe_dist.registry import LOSSES, ROUTERS
from moe_dist.routing.base import Router

H, E, K, T, STEPS = 16, 8, 2, 128, 300


class SkewedStream:
    """Tokens from 4 Gaussian clusters with probabilities 0.8 / (0.2 spread over 3)."""

    def __init__(self, seed: int = 1) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.centers_CH = torch.randn(4, H, generator=self.gen) * 3

    def sample(self) -> torch.Tensor:
        other = torch.randint(1, 4, (T,), generator=self.gen)
        cluster = torch.where(torch.rand(T, generator=self.gen) < 0.8, torch.zeros_like(other), other)
        return self.centers_CH[cluster] + torch.randn(T, H, generator=self.gen)


def make_router(name: str, **kw: object) -> Router:
    torch.manual_seed(0)
    cls = ROUTERS.get(name)
    return cls(cls.Config(top_k=K, **kw), H, E)


def held_out_gini(router: Router, stream: SkewedStream) -> float:
    router.eval()
    with torch.no_grad():
        counts_E = sum(router(stream.sample()).counts_E() for _ in range(4))
    return gini(counts_E)


def train(router: Router, loss_names: list[str], optimize: bool = True, steps: int = STEPS) -> SkewedStream:
    """Router-only steps: the named losses plus the router's own terms; ``after_step`` each step."""
    stream = SkewedStream()
    losses = [LOSSES.get(n)(LOSSES.get(n).Config(name=n), E, K) for n in loss_names]
    opt = torch.optim.Adam(router.parameters(), lr=1e-2) if optimize else None
    # Cosine decay, as in real runs: a constant-lr aux loss alone keeps oscillating around balance.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if opt is not None else None
    for _ in range(steps):
        routing = router(stream.sample())
        counts_E = routing.counts_E()
        load = Load(counts_E, T, 4, T // 4, global_counts_E=counts_E, global_num_tokens=T)  # 4 sequences
        terms = [loss(routing, load, router) for loss in losses] + list(routing.losses.values())
        if opt is not None:
            opt.zero_grad()
            torch.stack(terms).sum().backward()
            opt.step()
            sched.step()
        router.after_step(counts_E)
    return stream


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest and does not fight parallel test workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference_gini() -> float:
    router = make_router("topk_softmax")
    return held_out_gini(router, train(router, [], optimize=False, steps=0))


def test_reference_is_imbalanced(reference_gini: float) -> None:
    assert reference_gini > 0.45


@pytest.mark.parametrize("loss_name", ["switch", "global_batch", "seq_aux"])
def test_count_losses_balance(loss_name: str, reference_gini: float) -> None:
    router = make_router("topk_softmax")
    g = held_out_gini(router, train(router, [loss_name]))
    assert g < 0.4 * reference_gini, (loss_name, g, reference_gini)


def test_lpr_balances() -> None:
    untrained = make_router("lpr")
    g0 = held_out_gini(untrained, SkewedStream())
    router = make_router("lpr")
    g = held_out_gini(router, train(router, []))
    assert g0 > 0.45 and g < 0.4 * g0, (g, g0)


def test_sigmoid_bias_balances_without_gradient() -> None:
    router = make_router("topk_sigmoid_bias")
    weight0 = router.weight.detach().clone()
    stream = SkewedStream()
    with torch.no_grad():
        start = router(stream.sample()).counts_E()
    g0, vio0 = gini(start), max_violation(start)
    train(router, [], optimize=False)
    assert torch.equal(router.weight, weight0)  # nothing but the bias moved
    router.eval()
    with torch.no_grad():
        end = sum(router(stream.sample()).counts_E() for _ in range(4))
    assert g0 > 0.45 and gini(end) < 0.2 * g0, (gini(end), g0)
    assert max_violation(end) < 0.3 * vio0
    assert router.expert_bias_E.abs().max() > 0.01
