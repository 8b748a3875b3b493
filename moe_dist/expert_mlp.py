"""The routed experts' MLP as one autograd function: a per-expert GEMM loop with a hand-written backward.

Shape legend: X rows (expert-major), H hidden size, F ffn hidden size, e local experts,
n rows of one expert.

Used wherever ``grouped_mm`` is not (CPU always; CUDA without a working ``grouped_mm``). Next to
the same maths left to autograd it

* saves only ``x`` and the pre-activations ``h1`` (and ``h3`` for SwiGLU) for the backward and
  recomputes ``act(h1) * h3`` there (one elementwise pass), instead of keeping four [X, F]
  tensors;
* writes each expert's weight gradient straight into one [e, ...] gradient (no per-expert
  zero-filled copies, no stack), and gives experts without rows an exact zero gradient;
* runs the SwiGLU backward as four elementwise passes (``silu_backward`` is one fused kernel);
* multiplies through oneDNN on CPU in fp32 (``cpu_matmul``), ``torch.mm`` otherwise.

Forward, per expert i with rows x_nH:  h1 = x @ w1[i];  a = silu(h1) * (h3 = x @ w3[i])  (GELU:
a = gelu(h1));  y = a @ w2[i].
Backward, per expert:  da = dy @ w2[i]^T;  dw2[i] = a^T dy;  dh3 = da * silu(h1);
dh1 = silu'(h1) * da * h3;  dw1[i] = x^T dh1;  dw3[i] = x^T dh3;  dx = dh1 w1[i]^T + dh3 w3[i]^T.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moe_dist.cpu_matmul import CpuMatmul, matmul, uses_onednn


def _weight_grad(out_AB: torch.Tensor, a_AN: torch.Tensor, b_NB: torch.Tensor, onednn: bool) -> None:
    """``out = a @ b`` for a weight gradient; ``torch.mm`` writes ``out`` in place, oneDNN's
    result is copied in (measured: oneDNN's ~8 % faster GEMM outweighs the 2 MB copy)."""
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
        counts: list[int],
        onednn: bool,
    ) -> torch.Tensor:
        x_XH = x_XH.contiguous()
        h1s, h3s, ys = [], [], []
        for i, x_nH in enumerate(torch.split(x_XH, counts)):
            if x_nH.shape[0] == 0:
                continue
            h1 = matmul(x_nH, w1_eHF[i], onednn)
            h3 = matmul(x_nH, w3_eHF[i], onednn) if w3_eHF is not None else None
            a_nF = F.silu(h1).mul_(h3) if h3 is not None else F.gelu(h1)
            ys.append(matmul(a_nF, w2_eFH[i], onednn))
            h1s.append(h1)
            if h3 is not None:
                h3s.append(h3)
        ctx.counts, ctx.onednn, ctx.swiglu = counts, onednn, w3_eHF is not None
        ctx.num_h1 = len(h1s)
        ctx.save_for_backward(x_XH, w1_eHF, w3_eHF, w2_eFH, *h1s, *h3s)
        if not ys:
            return x_XH.new_zeros(0, w2_eFH.shape[-1])
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    @staticmethod
    def backward(ctx: Any, dy_XH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_XH, w1_eHF, w3_eHF, w2_eFH, *acts = ctx.saved_tensors
        h1s, h3s = acts[: ctx.num_h1], acts[ctx.num_h1 :]
        onednn, need_x = ctx.onednn, ctx.needs_input_grad[0]
        dy_XH = dy_XH.contiguous()
        dw1 = torch.empty_like(w1_eHF)
        dw3 = torch.empty_like(w3_eHF) if w3_eHF is not None else None
        dw2 = torch.empty_like(w2_eFH)
        dxs = []
        j = 0  # index among experts with rows (the saved activations)
        for i, (x_nH, dy_nH) in enumerate(zip(torch.split(x_XH, ctx.counts), torch.split(dy_XH, ctx.counts))):
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
            s_nF = F.silu(h1) if h3 is not None else F.gelu(h1)
            a_nF = s_nF * h3 if h3 is not None else s_nF
            # dw2 = a^T dy through torch.mm: oneDNN would copy a^T ([F, n], the larger operand)
            # first, which costs more than its faster kernel saves (measured, ~3 %).
            torch.mm(a_nF.t(), dy_nH, out=dw2[i])
            del a_nF
            da = matmul(dy_nH, w2_eFH[i].t(), onednn)
            if h3 is not None:
                dh3 = s_nF.mul_(da)
                dh1 = torch.ops.aten.silu_backward(da.mul_(h3), h1)
                _weight_grad(dw3[i], xt_Hn, dh3, onednn)  # type: ignore[index]
            else:
                dh3 = None
                dh1 = torch.ops.aten.gelu_backward(da, h1)
            _weight_grad(dw1[i], xt_Hn, dh1, onednn)
            if need_x:
                dx = matmul(dh1, w1_eHF[i].t(), onednn)
                if dh3 is not None:
                    dx.add_(matmul(dh3, w3_eHF[i].t(), onednn))
                dxs.append(dx)
        dx_XH = None
        if need_x:
            dx_XH = torch.cat(dxs) if dxs else torch.zeros_like(x_XH)
        return dx_XH, dw1, dw3, dw2, None, None


def expert_mlp(
    x_XH: torch.Tensor,
    w1_eHF: torch.Tensor,
    w3_eHF: torch.Tensor | None,
    w2_eFH: torch.Tensor,
    counts: list[int],
    cpu_matmul: CpuMatmul = "onednn",
) -> torch.Tensor:
    """``y_XH``: rows ``counts[i]`` of ``x_XH`` (expert-major) through expert i's MLP; SwiGLU when
    ``w3_eHF`` is given, else GELU. Differentiable in ``x`` and all weights."""
    if sum(counts) != x_XH.shape[0] or len(counts) != w1_eHF.shape[0]:
        raise ValueError(
            f"expert_mlp: {len(counts)} counts summing to {sum(counts)} for {x_XH.shape[0]} rows and "
            f"{w1_eHF.shape[0]} experts"
        )
    return _ExpertMLP.apply(x_XH, w1_eHF, w3_eHF, w2_eFH, counts, uses_onednn(x_XH, cpu_matmul))
