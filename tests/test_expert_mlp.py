"""The experts' hand-written autograd function: exact gradients (float64 gradcheck), the fp32
oneDNN path against a float64 reference, and what it keeps for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_dist.cpu_matmul import matmul, onednn_status, uses_onednn
from moe_dist.expert_mlp import expert_mlp

COUNTS = [5, 0, 4, 3]  # an expert without rows included
H, FF = 6, 10


def _weights(dtype: torch.dtype, swiglu: bool, seed: int = 0) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    e = len(COUNTS)
    w1 = torch.randn(e, H, FF, generator=g, dtype=dtype) * 0.3
    w3 = torch.randn(e, H, FF, generator=g, dtype=dtype) * 0.3 if swiglu else None
    w2 = torch.randn(e, FF, H, generator=g, dtype=dtype) * 0.3
    return [w1, w3, w2]


def _reference(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
    """The same maths left to autograd, one expert at a time."""
    outs = []
    for i, x_n in enumerate(torch.split(x, COUNTS)):
        h = F.silu(x_n @ w1[i]) * (x_n @ w3[i]) if w3 is not None else F.gelu(x_n @ w1[i])
        outs.append(h @ w2[i])
    return torch.cat(outs)


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
def test_gradcheck_float64(swiglu: bool) -> None:
    x = torch.randn(sum(COUNTS), H, dtype=torch.float64, requires_grad=True)
    w1, w3, w2 = (w.requires_grad_() if w is not None else None for w in _weights(torch.float64, swiglu))
    inputs = [t for t in (x, w1, w3, w2) if t is not None]

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        x_, w1_, *rest = ts
        w3_, w2_ = (rest[0], rest[1]) if swiglu else (None, rest[0])
        return expert_mlp(x_, w1_, w3_, w2_, COUNTS, "torch")

    assert torch.autograd.gradcheck(fn, inputs)
    expert_mlp(x, w1, w3, w2, COUNTS).sum().backward()
    assert torch.equal(w1.grad[1], torch.zeros(H, FF))  # no rows: an exact zero gradient, not None


@pytest.mark.parametrize("cpu_matmul", ["onednn", "torch"])
def test_fp32_matches_float64_reference(cpu_matmul: str) -> None:
    assert onednn_status() is None, onednn_status()  # torch's x86 wheels ship oneDNN
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(sum(COUNTS), H, generator=g, dtype=torch.float64)
    gy64 = torch.randn(sum(COUNTS), H, generator=g, dtype=torch.float64)
    w64 = _weights(torch.float64, True)
    leaves64 = [t.clone().requires_grad_() for t in (x64, *w64)]
    _reference(*leaves64).backward(gy64)
    leaves32 = [t.float().requires_grad_() for t in (x64, *w64)]
    assert uses_onednn(leaves32[0], cpu_matmul) == (cpu_matmul == "onednn")
    y32 = expert_mlp(*leaves32, COUNTS, cpu_matmul)
    y32.backward(gy64.float())
    y64 = _reference(*[t.detach() for t in leaves64])
    assert torch.allclose(y32.double(), y64, rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves32, leaves64):
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-5, atol=1e-6)


def test_onednn_matmul_reads_transposed_operands() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(33, 17, generator=g), torch.randn(17, 9, generator=g)
    want = a.double() @ b.double()
    for a_, b_ in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        assert torch.allclose(matmul(a_, b_, True).double(), want, rtol=1e-5, atol=1e-5)


def test_saves_only_inputs_and_pre_activations() -> None:
    """Kept for the backward: x, the weights, h1 and h3 (not act(h1), not act(h1) * h3)."""
    x = torch.randn(sum(COUNTS), H, requires_grad=True)
    w1, w3, w2 = (w.requires_grad_() for w in _weights(torch.float32, True))  # type: ignore[union-attr]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        expert_mlp(x, w1, w3, w2, COUNTS)
    activations = sum(t.numel() for t in saved if t.shape[-1] == FF and t.dim() == 2)
    assert activations == 2 * sum(COUNTS) * FF  # h1 and h3 of every row, nothing more
    assert sum(t.numel() for t in saved if t.dim() == 2 and t.shape[-1] == H) == sum(COUNTS) * H
