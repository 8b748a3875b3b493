"""The experts' elementwise work: the activation, the routing-weight scale, and their backward.

Shape legend: n rows, F ffn hidden size, G = 2F (SwiGLU: the fused gate|up pre-activation) or F
(GELU).

Forward, from the input projection's output ``h_nG``: SwiGLU ``u = silu(h1) * h3`` with
``h1 = h[:, :F]`` (gate) and ``h3 = h[:, F:]`` (up), GELU ``u = gelu(h)``; then ``a = s * u``.
Backward, from ``du = dy @ w2^T`` (the gradient of the unscaled ``u``): ``ds = rowsum(du * u)``,
``da = s * du``, SwiGLU ``dh3 = da * silu(h1)``, ``dh1 = da * h3 * silu'(h1)``, written into one
``dh_nG = [dh1 | dh3]`` (so the input gradient is ONE GEMM with the fused weight); GELU
``dh = da * gelu'(h)``; and ``a`` again (recomputed, for ``dw2 = a^T dy``).

Two implementations with the same results: eager, a handful of torch ops, several in place
(each a pass over [n, F]); and compiled (``moe_dist/ops/compiled.py``), the same maths as two fused
kernels, each input read once, fp32 arithmetic inside (fewer passes over [n, F]; figures in
docs/performance.md). The caller chooses (``compiled``); rows below 2 take the
eager path (torch.compile specialises sizes 0 and 1, which would compile again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_dist.ops.compiled import run_compiled

# ------------------------------------------------------------------------------------- eager


def _halves(h_nG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    F_ = h_nG.shape[-1] // 2
    return h_nG[:, :F_], h_nG[:, F_:]


def scaled_activation_eager(h_nG: torch.Tensor, s_n: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    """``s * (silu(h1) * h3)`` (SwiGLU) or ``s * gelu(h)``; a new [n, F] tensor."""
    if swiglu:
        h1, h3 = _halves(h_nG)
        a_nF = F.silu(h1).mul_(h3)
    else:
        a_nF = F.gelu(h_nG)
    return a_nF.mul_(s_n.to(a_nF.dtype).unsqueeze(1)) if s_n is not None else a_nF


def _scale_backward(du_nF: torch.Tensor, a_nF: torch.Tensor, s_n: torch.Tensor | None) -> torch.Tensor | None:
    """The routing weight's part of the backward, in place: ``ds = rowsum(du * u)`` (fp32), then
    ``a = s * u`` and ``du = s * du`` (= da); None without ``s``."""
    if s_n is None:
        return None
    ds_n = torch.linalg.vecdot(du_nF, a_nF).float()
    s_n1 = s_n.to(a_nF.dtype).unsqueeze(1)
    a_nF.mul_(s_n1)
    du_nF.mul_(s_n1)
    return ds_n


def activation_backward_eager(
    du_nF: torch.Tensor, h_nG: torch.Tensor, s_n: torch.Tensor | None, swiglu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(a, dh, ds)``; consumes ``du``."""
    if not swiglu:
        a_nF = F.gelu(h_nG)
        ds_n = _scale_backward(du_nF, a_nF, s_n)
        return a_nF, torch.ops.aten.gelu_backward(du_nF, h_nG), ds_n
    h1, h3 = _halves(h_nG)
    F_ = h1.shape[-1]
    dh_nG = torch.empty_like(h_nG)
    act_nF = torch.ops.aten.silu.out(h1, out=dh_nG[:, F_:])  # silu(h1), where dh3 will be
    a_nF = act_nF * h3
    ds_n = _scale_backward(du_nF, a_nF, s_n)
    act_nF.mul_(du_nF)  # dh3 = da * silu(h1), in place in dh's right half
    torch.ops.aten.silu_backward.grad_input(du_nF.mul_(h3), h1, grad_input=dh_nG[:, :F_])
    return a_nF, dh_nG, ds_n


# ------------------------------------------------------------------ compiled (fused) kernels


def _swiglu_forward(h_nG: torch.Tensor, s_n: torch.Tensor) -> torch.Tensor:
    h1, h3 = _halves(h_nG)
    return (F.silu(h1.float()) * h3.float() * s_n.float().unsqueeze(1)).to(h_nG.dtype)


def _gelu_forward(h_nF: torch.Tensor, s_n: torch.Tensor) -> torch.Tensor:
    return (F.gelu(h_nF.float()) * s_n.float().unsqueeze(1)).to(h_nF.dtype)


def _swiglu_backward(
    du_nF: torch.Tensor, h_nG: torch.Tensor, s_n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = du_nF.dtype
    h1_, h3_ = _halves(h_nG)
    du, h1, h3, s = du_nF.float(), h1_.float(), h3_.float(), s_n.float().unsqueeze(1)
    sig = torch.sigmoid(h1)
    silu = h1 * sig
    u = silu * h3
    da = du * s
    dh1 = da * h3 * sig * (1.0 + h1 * (1.0 - sig))
    return (u * s).to(dt), torch.cat([dh1, da * silu], dim=-1).to(dt), (du * u).sum(-1)


def _gelu_backward(
    du_nF: torch.Tensor, h_nF: torch.Tensor, s_n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = du_nF.dtype
    du, h, s = du_nF.float(), h_nF.float(), s_n.float().unsqueeze(1)
    u = F.gelu(h)
    dh = torch.ops.aten.gelu_backward(du * s, h)
    return (u * s).to(dt), dh.to(dt), (du * u).sum(-1)


def scaled_activation(
    h_nG: torch.Tensor, s_n: torch.Tensor | None, swiglu: bool, compiled: bool
) -> torch.Tensor:
    """``a = s * u`` (``u`` alone without ``s``)."""
    if compiled and s_n is not None and h_nG.shape[0] >= 2:
        out = (
            run_compiled("swiglu_forward", _swiglu_forward, h_nG, s_n)
            if swiglu
            else run_compiled("gelu_forward", _gelu_forward, h_nG, s_n)
        )
        if out is not None:
            return out
    return scaled_activation_eager(h_nG, s_n, swiglu)


def activation_backward(
    du_nF: torch.Tensor, h_nG: torch.Tensor, s_n: torch.Tensor | None, swiglu: bool, compiled: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(a, dh, ds)`` (``dh`` like ``h``: [dh1 | dh3] for SwiGLU; ``ds`` None without ``s``, else
    fp32). May consume ``du``."""
    if compiled and s_n is not None and du_nF.shape[0] >= 2:
        kernel = ("swiglu_backward", _swiglu_backward) if swiglu else ("gelu_backward", _gelu_backward)
        out = run_compiled(*kernel, du_nF, h_nG, s_n)
        if out is not None:
            return out
    return activation_backward_eager(du_nF, h_nG, s_n, swiglu)
