"""The routed experts' MLP as one autograd function: a per-expert GEMM loop with a hand-written backward.

Shape legend: X rows (expert-major), H hidden size, F ffn hidden size, e local experts,
n rows of one expert.

Used wherever ``grouped_mm`` is not (CPU always; CUDA without a working ``grouped_mm``;
``grouped_expert_mlp.py`` is the same function over one grouped GEMM). Next to the same maths
left to autograd it

* saves only ``x`` and the pre-activations ``h1`` (and ``h3`` for SwiGLU), plus the per-row
  routing weights, for the backward and recomputes ``act(h1) * h3`` there (one elementwise
  pass), instead of keeping four [X, F] tensors;
* applies each row's routing weight inside the MLP, before the down projection (optional
  ``scale_X``), so the combine after it is an unweighted sum that keeps nothing for its backward
  (a weighted combine would keep the [X, H] expert outputs to differentiate the weights);
* writes each expert's weight gradient straight into one [e, ...] gradient (no per-expert
  zero-filled copies, no stack), and gives experts without rows an exact zero gradient;
* runs the elementwise work (activation, scale, their backward) either as a few in-place torch
  ops or as two compiled fused kernels (``fused_activation.py``);
* multiplies through oneDNN on CPU in fp32 (``cpu_matmul``), ``torch.mm`` otherwise.

Forward, per expert i with rows x_nH and weights s_n:  h1 = x @ w1[i];  h3 = x @ w3[i];
u = silu(h1) * h3  (GELU: u = gelu(h1));  a = s * u;  y = a @ w2[i].
Backward, per expert:  du = dy @ w2[i]^T;  ds = rowsum(du * u);  da = s * du;  dw2[i] = a^T dy;
dh3 = da * silu(h1);  dh1 = silu'(h1) * da * h3;  dw1[i] = x^T dh1;  dw3[i] = x^T dh3;
dx = dh1 w1[i]^T + dh3 w3[i]^T.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_dist.ops.compiled import FusedKernels, use_compiled
from moe_dist.ops.cpu_matmul import CpuMatmul, matmul, uses_onednn
from moe_dist.ops.fused_activation import activation_backward, scaled_activation


def _weight_grad(out_AB: torch.Tensor, a_AN: torch.Tensor, b_NB: torch.Tensor, onednn: bool) -> None:
    """``out = a @ b`` for a weight gradient; ``torch.mm`` writes ``out`` in place, oneDNN's
    result is copied in (oneDNN's faster GEMM outweighs the copy; docs/performance.md)."""
    if onednn:
        out_AB.copy_(matmul(a_AN, b_NB, True))
    else:
        torch.mm(a_AN, b_NB, out=out_AB)


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_XH: torch.Tensor,
        w1_eHF: torch.Tensor,
        w3_eHF: torch.Tensor | None,
        w2_eFH: torch.Tensor,
        scale_X: torch.Tensor | None,
        counts: list[int],
        onednn: bool,
        compiled: bool,
    ) -> torch.Tensor:
        x_XH = x_XH.contiguous()
        scales = torch.split(scale_X, counts) if scale_X is not None else [None] * len(counts)
        h1s, h3s, ys = [], [], []
        for i, (x_nH, s_n) in enumerate(zip(torch.split(x_XH, counts), scales)):
            if x_nH.shape[0] == 0:
                continue
            h1 = matmul(x_nH, w1_eHF[i], onednn)
            h3 = matmul(x_nH, w3_eHF[i], onednn) if w3_eHF is not None else None
            a_nF = scaled_activation(h1, h3, s_n, compiled)
            ys.append(matmul(a_nF, w2_eFH[i], onednn))
            h1s.append(h1)
            if h3 is not None:
                h3s.append(h3)
        ctx.counts, ctx.onednn, ctx.compiled, ctx.swiglu = counts, onednn, compiled, w3_eHF is not None
        ctx.num_h1 = len(h1s)
        ctx.save_for_backward(x_XH, w1_eHF, w3_eHF, w2_eFH, scale_X, *h1s, *h3s)
        if not ys:
            return x_XH.new_zeros(0, w2_eFH.shape[-1])
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    @staticmethod
    def backward(ctx: Any, dy_XH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_XH, w1_eHF, w3_eHF, w2_eFH, scale_X, *acts = ctx.saved_tensors
        h1s, h3s = acts[: ctx.num_h1], acts[ctx.num_h1 :]
        onednn, need_x = ctx.onednn, ctx.needs_input_grad[0]
        counts = ctx.counts
        dy_XH = dy_XH.contiguous()
        dw1 = torch.empty_like(w1_eHF)
        dw3 = torch.empty_like(w3_eHF) if w3_eHF is not None else None
        dw2 = torch.empty_like(w2_eFH)
        scales = torch.split(scale_X, counts) if scale_X is not None else [None] * len(counts)
        dxs, dss = [], []
        j = 0  # index among experts with rows (the saved activations)
        for i, (x_nH, dy_nH, s_n) in enumerate(
            zip(torch.split(x_XH, counts), torch.split(dy_XH, counts), scales)
        ):
            if x_nH.shape[0] == 0:
                for dw in (dw1, dw3, dw2):
                    if dw is not None:
                        dw[i].zero_()
                continue
            h1 = h1s[j]
            h3 = h3s[j] if ctx.swiglu else None
            j += 1
            # Weight gradients: oneDNN copies a transposed left operand, so x^T is made once
            # for dw1 and dw3 (torch.mm reads it in place and writes into the gradient).
            xt_Hn = x_nH.t().contiguous() if onednn else x_nH.t()
            du = matmul(dy_nH, w2_eFH[i].t(), onednn)
            a_nF, dh1, dh3, ds_n = activation_backward(du, h1, h3, s_n, ctx.compiled)
            # dw2 = a^T dy through torch.mm: oneDNN would copy a^T ([F, n], the larger operand)
            # first, which costs more than its faster kernel saves (docs/performance.md).
            torch.mm(a_nF.t(), dy_nH, out=dw2[i])
            del a_nF
            if ds_n is not None:
                dss.append(ds_n)
            if dh3 is not None:
                _weight_grad(dw3[i], xt_Hn, dh3, onednn)  # type: ignore[index]
            _weight_grad(dw1[i], xt_Hn, dh1, onednn)
            if need_x:
                dx = matmul(dh1, w1_eHF[i].t(), onednn)
                if dh3 is not None:
                    dx.add_(matmul(dh3, w3_eHF[i].t(), onednn))
                dxs.append(dx)
        dx_XH = ds_X = None
        if need_x:
            dx_XH = torch.cat(dxs) if dxs else torch.zeros_like(x_XH)
        if scale_X is not None and ctx.needs_input_grad[4]:
            ds_X = (torch.cat(dss) if dss else scale_X.new_zeros(0)).to(scale_X.dtype)
        return dx_XH, dw1, dw3, dw2, ds_X, None, None, None


def check_expert_inputs(
    name: str, x_XH: torch.Tensor, w1_eHF: torch.Tensor, scale_X: torch.Tensor | None, num_rows: int | None
) -> None:
    """One message for rows, counts, weights and routing weights that do not fit together."""
    e = w1_eHF.shape[0]
    if num_rows is not None and num_rows != x_XH.shape[0]:
        raise ValueError(f"{name}: counts sum to {num_rows} for {x_XH.shape[0]} rows and {e} experts")
    if scale_X is not None and scale_X.shape != (x_XH.shape[0],):
        raise ValueError(f"{name}: scale_X has shape {tuple(scale_X.shape)} for {x_XH.shape[0]} rows")


def expert_mlp(
    x_XH: torch.Tensor,
    w1_eHF: torch.Tensor,
    w3_eHF: torch.Tensor | None,
    w2_eFH: torch.Tensor,
    counts: list[int],
    cpu_matmul: CpuMatmul = "onednn",
    scale_X: torch.Tensor | None = None,
    fused_kernels: FusedKernels = "auto",
) -> torch.Tensor:
    """``y_XH``: rows ``counts[i]`` of ``x_XH`` (expert-major) through expert i's MLP, each row's
    activation times ``scale_X`` (its routing weight) when given; SwiGLU when ``w3_eHF`` is given,
    else GELU. Differentiable in ``x``, all weights and ``scale_X``. ``fused_kernels``: see
    ``compiled.py``."""
    if len(counts) != w1_eHF.shape[0]:
        raise ValueError(f"expert_mlp: {len(counts)} counts for {w1_eHF.shape[0]} experts")
    check_expert_inputs("expert_mlp", x_XH, w1_eHF, scale_X, sum(counts))
    return _ExpertMLP.apply(
        x_XH,
        w1_eHF,
        w3_eHF,
        w2_eFH,
        scale_X,
        counts,
        uses_onednn(x_XH, cpu_matmul),
        use_compiled(x_XH, fused_kernels),
    )
