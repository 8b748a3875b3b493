"""The experts' hand-written autograd functions (per-expert loop and grouped GEMMs): exact
gradients (float64 gradcheck, routing weights included), the fp32 oneDNN and grouped_mm paths
against a float64 reference, the grouped path's probe, and what both keep for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_dist.ops import grouped_expert_mlp as gem
from moe_dist.ops.cpu_matmul import matmul, onednn_status, uses_onednn
from moe_dist.ops.expert_mlp import expert_mlp

COUNTS = [5, 0, 4, 3]  # an expert without rows included
H, FF = 8, 12  # multiples of 16 bytes in fp32: grouped_mm needs aligned rows


def _weights(dtype: torch.dtype, swiglu: bool, seed: int = 0) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    e = len(COUNTS)
    w1 = torch.randn(e, H, FF, generator=g, dtype=dtype) * 0.3
    w3 = torch.randn(e, H, FF, generator=g, dtype=dtype) * 0.3 if swiglu else None
    w2 = torch.randn(e, FF, H, generator=g, dtype=dtype) * 0.3
    return [w1, w3, w2]


def _reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor | None,
    w2: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same maths left to autograd, one expert at a time; the routing weight scales the
    expert's output (the layer's definition), which equals scaling the activation."""
    outs = []
    for i, x_n in enumerate(torch.split(x, COUNTS)):
        h = F.silu(x_n @ w1[i]) * (x_n @ w3[i]) if w3 is not None else F.gelu(x_n @ w1[i])
        outs.append(h @ w2[i])
    y = torch.cat(outs)
    return y if scale is None else y * scale.unsqueeze(1)


def _fused(w1: torch.Tensor, w3: torch.Tensor | None) -> torch.Tensor:
    """The fused input projection [w1 | w3] (w1 alone for GELU), differentiable."""
    return torch.cat([w1, w3], dim=-1) if w3 is not None else w1


def _split(ts: tuple[torch.Tensor, ...], swiglu: bool) -> tuple:
    """(x, w13, w2) from the differentiable inputs (x, w1, [w3,] w2): the gradients of w1 and w3
    come through the concatenation, so gradcheck checks them against the split maths."""
    x_, w1_, *rest = ts
    return (x_, _fused(w1_, rest[0]), rest[1]) if swiglu else (x_, w1_, rest[0])


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
def test_gradcheck_float64(swiglu: bool) -> None:
    x = torch.randn(sum(COUNTS), H, dtype=torch.float64, requires_grad=True)
    w1, w3, w2 = (w.requires_grad_() if w is not None else None for w in _weights(torch.float64, swiglu))
    inputs = [t for t in (x, w1, w3, w2) if t is not None]
    scale = torch.rand(sum(COUNTS), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *ts: expert_mlp(*_split(ts, swiglu), COUNTS, "torch"), inputs)
    assert torch.autograd.gradcheck(
        lambda *ts: expert_mlp(*_split(ts[:-1], swiglu), COUNTS, "torch", ts[-1]), [*inputs, scale]
    )
    expert_mlp(x, _fused(w1, w3), w2, COUNTS).sum().backward()
    assert torch.equal(w1.grad[1], torch.zeros(H, FF))  # no rows: an exact zero gradient, not None


def _run(path: str, leaves: list[torch.Tensor]) -> torch.Tensor:
    """The experts on ``leaves`` = (x, w1, w3, w2, scale) through one of the three paths."""
    x, w1, w3, w2, scale = leaves
    w13 = _fused(w1, w3)
    if path == "grouped_mm":
        return gem.grouped_expert_mlp(x, w13, w2, torch.tensor(COUNTS), scale)
    return expert_mlp(x, w13, w2, COUNTS, path, scale)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["onednn", "torch", "grouped_mm"])
def test_fp32_matches_float64_reference(path: str) -> None:
    assert onednn_status() is None, onednn_status()  # torch's x86 wheels ship oneDNN
    assert gem.grouped_experts_work(torch.device("cpu"), torch.float32)  # CPU grouped_mm exists
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(sum(COUNTS), H, generator=g, dtype=torch.float64)
    gy64 = torch.randn(sum(COUNTS), H, generator=g, dtype=torch.float64)
    scale64 = torch.rand(sum(COUNTS), generator=g, dtype=torch.float64)
    w64 = _weights(torch.float64, True)
    leaves64 = [t.clone().requires_grad_() for t in (x64, *w64, scale64)]  # type: ignore[union-attr]
    _reference(*leaves64).backward(gy64)
    leaves32 = [t.float().requires_grad_() for t in (x64, *w64, scale64)]  # type: ignore[union-attr]
    if path != "grouped_mm":
        assert uses_onednn(leaves32[0], path) == (path == "onednn")  # type: ignore[arg-type]
    y32 = _run(path, leaves32)
    y32.backward(gy64.float())
    y64 = _reference(*[t.detach() for t in leaves64])
    assert torch.allclose(y32.double(), y64, rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves32, leaves64):
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(leaves32[1].grad[1], torch.zeros(H, FF))  # the expert without rows


def test_grouped_probe_rejects_a_wrong_or_failing_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grouped_mm that leaves an empty group's weight gradient unwritten, or raises, makes the
    probe say no (the layer then takes the per-expert loop); the real one passes."""
    real = gem._grouped_mm
    cpu = torch.device("cpu")

    def garbage_in_empty_groups(a: torch.Tensor, b: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
        out = real(a, b, offs_e)
        if out.dim() == 3:  # weight gradient: group 1 of the probe has no rows
            out[1] = 7.0
        return out

    def raises(a: torch.Tensor, b: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("grouped_mm: unsupported layout")

    for fake, works in ((garbage_in_empty_groups, False), (raises, False), (real, True)):
        monkeypatch.setattr(gem, "_WORKS", {})
        monkeypatch.setattr(gem, "_grouped_mm", fake)
        assert gem.grouped_experts_work(cpu, torch.float32) is works
    monkeypatch.setattr(gem, "_WORKS", {})  # first asked during an evaluation: still probed right
    with torch.no_grad():
        assert gem.grouped_experts_work(cpu, torch.float32)


def test_onednn_matmul_reads_transposed_operands() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(33, 17, generator=g), torch.randn(17, 9, generator=g)
    want = a.double() @ b.double()
    for a_, b_ in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        assert torch.allclose(matmul(a_, b_, True).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["torch", "grouped_mm"])
def test_saves_only_inputs_and_pre_activations(path: str) -> None:
    """Kept for the backward: x, the weights, the routing weights and the fused pre-activation
    [h1 | h3] (not act(h1), not act(h1) * h3, not the output)."""
    X = sum(COUNTS)
    w1, w3, w2 = _weights(torch.float32, True)
    w13 = _fused(w1, w3).requires_grad_()  # type: ignore[arg-type]
    x, s_ = torch.randn(X, H, requires_grad=True), torch.rand(X, requires_grad=True)
    leaves = [x, w13, w2.requires_grad_(), s_]  # type: ignore[union-attr]
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x, w13_, w2_, scale = leaves
        if path == "grouped_mm":
            gem.grouped_expert_mlp(x, w13_, w2_, torch.tensor(COUNTS), scale)
        else:
            expert_mlp(x, w13_, w2_, COUNTS, path, scale)  # type: ignore[arg-type]
    activations = sum(t.numel() for t in saved if t.shape[-1] == 2 * FF and t.dim() == 2)
    assert activations == 2 * X * FF  # [h1 | h3] of every row, nothing more
    assert not [t for t in saved if t.dim() == 2 and t.shape[-1] == FF]
    assert sum(t.numel() for t in saved if t.dim() == 2 and t.shape[-1] == H) == X * H
    assert sum(t.numel() for t in saved if t.dim() == 1 and t.dtype == torch.float32) == X  # scale
