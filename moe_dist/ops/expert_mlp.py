"""The routed experts' MLP as one autograd function: a per-expert GEMM loop with a hand-written backward.

Shape legend: X rows (expert-major), H hidden size, F ffn hidden size, G input-projection width
(2F for SwiGLU: gate | up, fused; F for GELU), e local experts, n rows of one expert.

Used wherever ``grouped_mm`` is not (CPU by default; CUDA without a working ``grouped_mm``;
``grouped_expert_mlp.py`` is the same function over one grouped GEMM). Next to the same maths
left to autograd it

* saves only ``x`` and the pre-activation ``h`` ([n, G]), plus the per-row routing weights, for
  the backward and recomputes the activation there (one elementwise pass), instead of keeping
  four [X, F] tensors;
* computes SwiGLU's gate and up projections as ONE GEMM with the fused ``w13 [H, 2F]`` weight
  (Hugging Face's ``gate_up_proj``, Megatron's gated ``linear_fc1``), and the input gradient as
  one GEMM with the fused ``dh = [dh1 | dh3]``: no second GEMM, no add;
* applies each row's routing weight inside the MLP, before the down projection (optional
  ``scale_X``), so the combine after it is an unweighted sum that keeps nothing for its backward
  (a weighted combine would keep the [X, H] expert outputs to differentiate the weights);
* writes each expert's weight gradient straight into one [e, ...] gradient (no per-expert
  zero-filled copies, no stack), and gives experts without rows an exact zero gradient;
* runs the elementwise work (activation, scale, their backward) either as a few in-place torch
  ops or as two compiled fused kernels (``fused_activation.py``);
* multiplies through oneDNN on CPU in fp32 (``cpu_matmul``), ``torch.mm`` otherwise.

Forward, per expert i with rows x_nH and weights s_n:  h = x @ w13[i]  ([h1 | h3]);
u = silu(h1) * h3  (GELU: u = gelu(h));  a = s * u;  y = a @ w2[i].
Backward, per expert:  du = dy @ w2[i]^T;  ds = rowsum(du * u);  da = s * du;  dw2[i] = a^T dy;
dh3 = da * silu(h1);  dh1 = silu'(h1) * da * h3;  dh = [dh1 | dh3];  dw13[i] = x^T dh;
dx = dh w13[i]^T.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_dist.ops.compiled import FusedKernels, use_compiled
from moe_dist.ops.cpu_matmul import CpuMatmul, matmul, uses_onednn
from moe_dist.ops.fused_activation import activation_backward, scaled_activation


def is_swiglu(w13_eHG: torch.Tensor, w2_eFH: torch.Tensor) -> bool:
    """SwiGLU when the input projection is twice as wide as the down projection's input."""
    return w13_eHG.shape[-1] == 2 * w2_eFH.shape[-2]


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
        w13_eHG: torch.Tensor,
        w2_eFH: torch.Tensor,
        scale_X: torch.Tensor | None,
        counts: list[int],
        onednn: bool,
        compiled: bool,
    ) -> torch.Tensor:
        x_XH = x_XH.contiguous()
        swiglu = is_swiglu(w13_eHG, w2_eFH)
        scales = torch.split(scale_X, counts) if scale_X is not None else [None] * len(counts)
        hs, ys = [], []
        for i, (x_nH, s_n) in enumerate(zip(torch.split(x_XH, counts), scales)):
            if x_nH.shape[0] == 0:
                continue
            h_nG = matmul(x_nH, w13_eHG[i], onednn)
            a_nF = scaled_activation(h_nG, s_n, swiglu, compiled)
            ys.append(matmul(a_nF, w2_eFH[i], onednn))
            hs.append(h_nG)
        ctx.counts, ctx.onednn, ctx.compiled, ctx.swiglu = counts, onednn, compiled, swiglu
        ctx.save_for_backward(x_XH, w13_eHG, w2_eFH, scale_X, *hs)
        if not ys:
            return x_XH.new_zeros(0, w2_eFH.shape[-1])
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    @staticmethod
    def backward(ctx: Any, dy_XH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_XH, w13_eHG, w2_eFH, scale_X, *hs = ctx.saved_tensors
        onednn, need_x = ctx.onednn, ctx.needs_input_grad[0]
        counts = ctx.counts
        dy_XH = dy_XH.contiguous()
        dw13 = torch.empty_like(w13_eHG)
        dw2 = torch.empty_like(w2_eFH)
        scales = torch.split(scale_X, counts) if scale_X is not None else [None] * len(counts)
        dxs, dss = [], []
        j = 0  # index among experts with rows (the saved pre-activations)
        for i, (x_nH, dy_nH, s_n) in enumerate(
            zip(torch.split(x_XH, counts), torch.split(dy_XH, counts), scales)
        ):
            if x_nH.shape[0] == 0:
                dw13[i].zero_()
                dw2[i].zero_()
                continue
            h_nG = hs[j]
            j += 1
            du = matmul(dy_nH, w2_eFH[i].t(), onednn)
            a_nF, dh_nG, ds_n = activation_backward(du, h_nG, s_n, ctx.swiglu, ctx.compiled)
            # dw2 = a^T dy through torch.mm: oneDNN would copy a^T ([F, n], the larger operand)
            # first, which costs more than its faster kernel saves (docs/performance.md).
            torch.mm(a_nF.t(), dy_nH, out=dw2[i])
            del a_nF
            if ds_n is not None:
                dss.append(ds_n)
            # oneDNN copies a transposed left operand; torch.mm reads it in place.
            xt_Hn = x_nH.t().contiguous() if onednn else x_nH.t()
            _weight_grad(dw13[i], xt_Hn, dh_nG, onednn)
            if need_x:
                dxs.append(matmul(dh_nG, w13_eHG[i].t(), onednn))
        dx_XH = ds_X = None
        if need_x:
            dx_XH = torch.cat(dxs) if dxs else torch.zeros_like(x_XH)
        if scale_X is not None and ctx.needs_input_grad[3]:
            ds_X = (torch.cat(dss) if dss else scale_X.new_zeros(0)).to(scale_X.dtype)
        return dx_XH, dw13, dw2, ds_X, None, None, None


def check_expert_inputs(
    name: str,
    x_XH: torch.Tensor,
    w13_eHG: torch.Tensor,
    w2_eFH: torch.Tensor,
    scale_X: torch.Tensor | None,
    num_rows: int | None,
) -> None:
    """One message for rows, counts, weights and routing weights that do not fit together."""
    e, G, F_ = w13_eHG.shape[0], w13_eHG.shape[-1], w2_eFH.shape[-2]
    if G not in (F_, 2 * F_) or w2_eFH.shape[0] != e:
        raise ValueError(
            f"{name}: w13 {tuple(w13_eHG.shape)} and w2 {tuple(w2_eFH.shape)} do not fit "
            "(w13 is [e, H, 2F] for SwiGLU or [e, H, F] for GELU, w2 is [e, F, H])"
        )
    if num_rows is not None and num_rows != x_XH.shape[0]:
        raise ValueError(f"{name}: counts sum to {num_rows} for {x_XH.shape[0]} rows and {e} experts")
    if scale_X is not None and scale_X.shape != (x_XH.shape[0],):
        raise ValueError(f"{name}: scale_X has shape {tuple(scale_X.shape)} for {x_XH.shape[0]} rows")


def expert_mlp(
    x_XH: torch.Tensor,
    w13_eHG: torch.Tensor,
    w2_eFH: torch.Tensor,
    counts: list[int],
    cpu_matmul: CpuMatmul = "onednn",
    scale_X: torch.Tensor | None = None,
    fused_kernels: FusedKernels = "auto",
) -> torch.Tensor:
    """``y_XH``: rows ``counts[i]`` of ``x_XH`` (expert-major) through expert i's MLP, each row's
    activation times ``scale_X`` (its routing weight) when given; SwiGLU when ``w13_eHG`` is
    ``[e, H, 2F]`` (gate | up), GELU when it is ``[e, H, F]``. Differentiable in ``x``, both
    weights and ``scale_X``. ``fused_kernels``: see ``compiled.py``."""
    if len(counts) != w13_eHG.shape[0]:
        raise ValueError(f"expert_mlp: {len(counts)} counts for {w13_eHG.shape[0]} experts")
    check_expert_inputs("expert_mlp", x_XH, w13_eHG, w2_eFH, scale_X, sum(counts))
    return _ExpertMLP.apply(
        x_XH,
        w13_eHG,
        w2_eFH,
        scale_X,
        counts,
        uses_onednn(x_XH, cpu_matmul),
        use_compiled(x_XH, fused_kernels),
    )
