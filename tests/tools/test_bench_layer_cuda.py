"""``tools/bench_layer_cuda.py``'s timed steps, checked on CPU: by default each starts without
gradients (as a training step with one micro-batch does), so two steps leave the gradients of
one; ``--accumulate-grads`` (issue 24's method) leaves their sum. The layer step and the experts
alone (the routing share's reference) must be timed the same way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from tools.bench_common import layer_step, our_layer  # noqa: E402
from tools.bench_layer_cuda import _experts_step, fresh_grads  # noqa: E402


def _grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("accumulate", [False, True])
def test_layer_step_grads_fresh_or_accumulated(accumulate: bool) -> None:
    torch.manual_seed(0)
    layer = our_layer(32, 16, 4, 2, ParallelGroups.single(), "eager").double()
    x = torch.randn(24, 32, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(24, 32, dtype=torch.float64)
    tensors = [x, *layer.parameters()]
    step = layer_step(layer, x, gy)
    step()
    once = _grads(tensors)
    timed = fresh_grads(step, tensors, keep=accumulate)
    timed()
    timed()
    factor = 3.0 if accumulate else 1.0  # the first call above, then two timed ones
    for got, want in zip(_grads(tensors), once, strict=True):
        torch.testing.assert_close(got, factor * want)


@pytest.mark.parametrize("accumulate", [False, True])
def test_experts_step_grads_fresh_or_accumulated(accumulate: bool) -> None:
    torch.manual_seed(0)
    layer = our_layer(32, 16, 4, 2, ParallelGroups.single(), "eager").double()
    x = torch.randn(24, 32, dtype=torch.float64)
    params = list(layer.experts.parameters())
    step = _experts_step(layer, x, accumulate)
    step()
    once = _grads(params)
    step()
    for got, want in zip(_grads(params), once, strict=True):
        torch.testing.assert_close(got, (2.0 if accumulate else 1.0) * want)
