"""The experts' elementwise work compiled into fused kernels gives the eager results, in fp32 and
bf16, SwiGLU and GELU, for any row count without compiling again; a compiler failure falls back
to eager with a warning (``moe_dist.ops.compiled``). Compiling on CPU takes tens of seconds, hence
``slow``."""

from __future__ import annotations

import logging

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.ops import compiled
from moe_dist.ops import fused_activation as fa
from moe_dist.parallel.groups import ParallelGroups

FF = 24


def _inputs(n: int, dtype: torch.dtype, swiglu: bool = True, seed: int = 0) -> list[torch.Tensor]:
    """du [n, F], the pre-activation h ([h1 | h3] for SwiGLU, [n, 2F]; [n, F] for GELU), s [n]."""
    g = torch.Generator().manual_seed(seed)
    du, h = (torch.randn(n, FF * k, generator=g).to(dtype) for k in (1, 2 if swiglu else 1))
    return [du, h, torch.rand(n, generator=g)]


def test_eager_swiglu_matches_autograd_on_the_split_halves() -> None:
    """The fused [dh1 | dh3] and ds against autograd of s * silu(h1) * h3, float64."""
    du, h, s = (t.double() for t in _inputs(11, torch.float64))
    h1, h3 = (t.clone().requires_grad_() for t in h.chunk(2, dim=-1))
    s_ = s.clone().requires_grad_()
    u = torch.nn.functional.silu(h1) * h3
    (u * s_.unsqueeze(1)).backward(du)
    a, dh, ds = fa.activation_backward(du.clone(), h, s, swiglu=True, compiled=False)
    torch.testing.assert_close(a, (u * s.unsqueeze(1)).detach())
    torch.testing.assert_close(dh, torch.cat([h1.grad, h3.grad], dim=-1))
    torch.testing.assert_close(ds.double(), s_.grad, rtol=1e-6, atol=1e-6)  # ds is fp32 by design
    torch.testing.assert_close(fa.scaled_activation(h, s, swiglu=True, compiled=False), a)


@pytest.mark.slow
@pytest.mark.parametrize(
    "swiglu,dtype",
    [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
    ids=["swiglu_fp32", "gelu_fp32", "swiglu_bf16"],
)
def test_compiled_equals_eager(swiglu: bool, dtype: torch.dtype) -> None:
    from torch._dynamo.utils import counters

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    frames = None
    for n in (37, 5, 130):  # the second and third row counts must reuse the first compile
        du, h, s = _inputs(n, dtype, swiglu, seed=n)
        want_a = fa.scaled_activation(h, s, swiglu, compiled=False)
        want = fa.activation_backward(du.clone(), h, s, swiglu, compiled=False)
        # grad mode, autocast and requires_grad differ between calls: no recompile either
        with torch.enable_grad() if n == 5 else torch.no_grad():
            got_a = fa.scaled_activation(h.requires_grad_(n == 130), s, swiglu, compiled=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=n == 37):
            got = fa.activation_backward(du.clone(), h, s, swiglu, compiled=True)
        assert not compiled.compile_failures(), compiled.compile_failures()
        torch.testing.assert_close(got_a.float(), want_a.float(), **tol)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                assert g.dtype == w.dtype
                torch.testing.assert_close(g.float(), w.float(), **tol)
        if frames is None:
            frames = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == frames, "compiled again for a new row count"


@pytest.mark.slow
def test_rows_are_symbolic_and_widths_are_constants_of_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """One compile serves every row count, but a new width compiles its own kernel: widths are
    constants, so the generated index arithmetic has no runtime division by F (on an H200 the
    kernels with symbolic widths ran at 20-40 % of their memory bound, docs/performance.md)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled, "_compiled", {})
    torch._dynamo.reset()
    graphs = []
    for n, width in ((37, FF), (130, FF), (37, 2 * FF), (64, FF), (90, 2 * FF)):
        g = torch.Generator().manual_seed(n)
        h, s = torch.randn(n, 2 * width, generator=g), torch.rand(n, generator=g)
        got = fa.scaled_activation(h, s, swiglu=True, compiled=True)
        torch.testing.assert_close(got, fa.scaled_activation(h, s, swiglu=True, compiled=False))
        graphs.append(counters["stats"]["unique_graphs"])
    assert not compiled.compile_failures(), compiled.compile_failures()
    first = graphs[0]
    assert graphs == [first, first, first + 1, first + 1, first + 1], graphs


def test_compiler_failure_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(fn, **kw):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            raise RuntimeError("inductor: no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", {})
    du, h, s = _inputs(9, torch.float32)
    with caplog.at_level(logging.WARNING, logger="moe_dist.ops.compiled"):
        got = fa.activation_backward(du.clone(), h, s, True, compiled=True)
        fa.activation_backward(du.clone(), h, s, True, compiled=True)  # no second attempt or warning
    want = fa.activation_backward(du.clone(), h, s, True, compiled=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert compiled.compile_failures() == {"swiglu_backward": "RuntimeError: inductor: no C++ compiler found"}
    assert len([r for r in caplog.records if "swiglu_backward" in r.message]) == 1


def test_auto_compiles_on_cuda_only() -> None:
    x = torch.zeros(1)
    assert not compiled.use_compiled(x, "auto")
    assert compiled.use_compiled(x, "compiled") and not compiled.use_compiled(x, "eager")


@pytest.mark.slow
@pytest.mark.parametrize("grouped_mm", [False, True], ids=["per_expert_loop", "grouped_mm"])
def test_layer_with_compiled_activation_equals_eager(grouped_mm: bool) -> None:
    """``model.moe.fused_kernels: compiled`` through the layer (the experts' activation and the
    combine's gather-and-sum), both expert paths."""
    results = []
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        cfg = MoEConfig(
            num_experts=4,
            router={"name": "topk_softmax", "top_k": 2},
            experts={"ffn_hidden_size": FF, "init_std": 0.5},
            fused_kernels=mode,
        )
        layer = MoELayer(cfg, 16, ParallelGroups.single())
        layer.experts.backend = "grouped_mm" if grouped_mm else "loop"
        x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, _ = layer(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, [p.grad for p in layer.parameters()]))
    assert not compiled.compile_failures(), compiled.compile_failures()
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp0):  # weight gradients sum over rows: fp32 rounding of two kernels
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
