"""The experts' elementwise work: the activation, the routing-weight scale, and their backward.

Shape legend: n rows, F ffn hidden size.

Forward: ``a = s * u`` with ``u = silu(h1) * h3`` (SwiGLU) or ``u = gelu(h1)``. Backward, from
``du = dy @ w2^T`` (the gradient of the unscaled ``u``): ``ds = rowsum(du * u)``, ``da = s * du``,
SwiGLU ``dh3 = da * silu(h1)``, ``dh1 = da * h3 * silu'(h1)``; GELU ``dh1 = da * gelu'(h1)``; and
``a`` again (recomputed, for ``dw2 = a^T dy``).

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


def scaled_activation_eager(
    h1_nF: torch.Tensor, h3_nF: torch.Tensor | None, s_n: torch.Tensor | None
) -> torch.Tensor:
    """``s * (silu(h1) * h3)`` (SwiGLU) or ``s * gelu(h1)``; a new tensor."""
    a_nF = F.silu(h1_nF).mul_(h3_nF) if h3_nF is not None else F.gelu(h1_nF)
    return a_nF.mul_(s_n.to(a_nF.dtype).unsqueeze(1)) if s_n is not None else a_nF


def activation_backward_eager(
    du_nF: torch.Tensor, h1_nF: torch.Tensor, h3_nF: torch.Tensor | None, s_n: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(a, dh1, dh3, ds)``; consumes ``du`` (its memory becomes ``dh1``)."""
    act_nF = F.silu(h1_nF) if h3_nF is not None else F.gelu(h1_nF)
    a_nF = act_nF * h3_nF if h3_nF is not None else act_nF  # GELU: act is not needed after this
    ds_n = None
    if s_n is not None:
        ds_n = torch.linalg.vecdot(du_nF, a_nF).float()
        s_n1 = s_n.to(a_nF.dtype).unsqueeze(1)
        a_nF.mul_(s_n1)
        du_nF.mul_(s_n1)  # now da
    if h3_nF is None:
        return a_nF, torch.ops.aten.gelu_backward(du_nF, h1_nF), None, ds_n
    dh3_nF = act_nF.mul_(du_nF)
    dh1_nF = torch.ops.aten.silu_backward.grad_input(du_nF.mul_(h3_nF), h1_nF, grad_input=du_nF)
    return a_nF, dh1_nF, dh3_nF, ds_n


# ------------------------------------------------------------------ compiled (fused) kernels


def _swiglu_forward(h1_nF: torch.Tensor, h3_nF: torch.Tensor, s_n: torch.Tensor) -> torch.Tensor:
    return (F.silu(h1_nF.float()) * h3_nF.float() * s_n.float().unsqueeze(1)).to(h1_nF.dtype)


def _gelu_forward(h1_nF: torch.Tensor, s_n: torch.Tensor) -> torch.Tensor:
    return (F.gelu(h1_nF.float()) * s_n.float().unsqueeze(1)).to(h1_nF.dtype)


def _swiglu_backward(
    du_nF: torch.Tensor, h1_nF: torch.Tensor, h3_nF: torch.Tensor, s_n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = du_nF.dtype
    du, h1, h3, s = du_nF.float(), h1_nF.float(), h3_nF.float(), s_n.float().unsqueeze(1)
    sig = torch.sigmoid(h1)
    silu = h1 * sig
    u = silu * h3
    da = du * s
    dh1 = da * h3 * sig * (1.0 + h1 * (1.0 - sig))
    return (u * s).to(dt), dh1.to(dt), (da * silu).to(dt), (du * u).sum(-1)


def _gelu_backward(
    du_nF: torch.Tensor, h1_nF: torch.Tensor, s_n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = du_nF.dtype
    du, h1, s = du_nF.float(), h1_nF.float(), s_n.float().unsqueeze(1)
    u = F.gelu(h1)
    dh1 = torch.ops.aten.gelu_backward(du * s, h1)
    return (u * s).to(dt), dh1.to(dt), (du * u).sum(-1)


def scaled_activation(
    h1_nF: torch.Tensor, h3_nF: torch.Tensor | None, s_n: torch.Tensor | None, compiled: bool
) -> torch.Tensor:
    """``a = s * u`` (``u`` alone without ``s``)."""
    if compiled and s_n is not None and h1_nF.shape[0] >= 2:
        out = (
            run_compiled("swiglu_forward", _swiglu_forward, h1_nF, h3_nF, s_n)
            if h3_nF is not None
            else run_compiled("gelu_forward", _gelu_forward, h1_nF, s_n)
        )
        if out is not None:
            return out
    return scaled_activation_eager(h1_nF, h3_nF, s_n)


def activation_backward(
    du_nF: torch.Tensor,
    h1_nF: torch.Tensor,
    h3_nF: torch.Tensor | None,
    s_n: torch.Tensor | None,
    compiled: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(a, dh1, dh3, ds)`` (``dh3`` None for GELU, ``ds`` None without ``s``; ``ds`` in fp32).
    May consume ``du``."""
    if compiled and s_n is not None and du_nF.shape[0] >= 2:
        if h3_nF is not None:
            out = run_compiled("swiglu_backward", _swiglu_backward, du_nF, h1_nF, h3_nF, s_n)
            if out is not None:
                return out
        else:
            out = run_compiled("gelu_backward", _gelu_backward, du_nF, h1_nF, s_n)
            if out is not None:
                a_nF, dh1_nF, ds_n = out
                return a_nF, dh1_nF, None, ds_n
    return activation_backward_eager(du_nF, h1_nF, h3_nF, s_n)
