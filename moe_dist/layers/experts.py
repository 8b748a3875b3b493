"""Expert MLPs: the routed experts of one EP rank as one grouped GEMM, and dense shared experts.

Shape legend: X dispatched rows (expert-major), H hidden size, F ffn hidden size, G = 2F
(SwiGLU: gate | up fused) or F (GELU), E experts (global), e local experts on this EP rank.

``GroupedExperts.forward(x_XH, tokens_per_expert_e)``: rows ``x_XH`` are sorted by local
expert, ``tokens_per_expert_e[i]`` rows for local expert i (zero is fine).

1. Compute dtype: under autocast, rows and weights go to the autocast dtype (``compute_dtype``;
   the weights through ``cast_weight``, once per optimizer step); the caller casts the result.
2. h_XG = x @ w13[i] per expert group of rows: SwiGLU's gate and up projections as ONE GEMM.
3. a_XF = silu(h1) * h3 (GELU: gelu(h)), times the row's routing weight.
4. y_XH = a_XF @ w2[i].

With ``scale_X`` (each row's routing weight) the activation is scaled before step 2, so the
combine that follows is a plain sum (see ``expert_mlp.py``).

On CUDA each GEMM is one ``torch.nn.functional.grouped_mm`` call where it works
(``grouped_expert_mlp.py``, probed once per (device, dtype) forward and backward; 16-byte
aligned rows). Elsewhere, and on CPU by choice, ``expert_mlp`` runs the MLP per expert with oneDNN
GEMMs on CPU (``model.moe.experts.backend``, see ``GroupedExperts.use_grouped_mm``). Both save
only the GEMMs' inputs for the backward and give zero (not None) weight gradients to experts
without tokens.

Layout: ``w13_eHG`` holds ``[w1 | w3]`` along its last axis (columns ``[0, F)`` the gate w1,
``[F, 2F)`` the up projection w3), as Hugging Face's ``gate_up_proj``, torchtitan and Megatron's
gated ``linear_fc1`` store them; ``w1_eHF`` and ``w3_eHF`` are views of its halves. Checkpoints
of the earlier split layout are joined on load (``training/checkpoint_upgrade.py``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.layers.split_layout import join_on_load
from moe_dist.ops.compiled import FusedKernels
from moe_dist.ops.compute_dtype import cast_weight, compute_dtype
from moe_dist.ops.cpu_matmul import CpuMatmul
from moe_dist.ops.expert_mlp import expert_mlp
from moe_dist.ops.grouped_expert_mlp import ExpertsBackend, grouped_expert_mlp, grouped_experts_work


class GroupedExperts(nn.Module):
    """The ``num_local_experts`` routed experts of one EP rank.

    Weights ``w13_eHG`` ([w1 | w3] for SwiGLU, w1 alone for GELU) and ``w2_eFH`` carry
    ``expert_parallel = True``: their gradients reduce over the expert-data-parallel group only.

    Init: every expert weight ~ N(0, init_std), ``w2`` ~ N(0, out_std) with ``out_std`` =
    ``init_std / sqrt(2)`` by default (the output projection feeds a residual sum; pass a
    depth-scaled value for deep models). All ``num_experts`` global experts are drawn in global
    order from the default torch generator (every expert's w1, then every expert's w3, then w2:
    the order of the split layout, so both layouts start from the same weights) and only this
    rank's slice is kept, so the weights of global expert g, and all later draws, are identical
    for every EP size.

    ``backend``: ``grouped_mm`` (one grouped GEMM per projection, where the probe passes),
    ``loop`` (``expert_mlp``, a GEMM per expert) or ``auto`` (grouped_mm on CUDA, the loop on CPU).
    """

    def __init__(
        self,
        num_local_experts: int,
        hidden: int,
        ffn_hidden: int,
        activation: Literal["swiglu", "gelu"] = "swiglu",
        init_std: float = 0.02,
        out_std: float | None = None,
        num_experts: int | None = None,
        first_expert: int = 0,
        cpu_matmul: CpuMatmul = "onednn",
        fused_kernels: FusedKernels = "auto",
        backend: ExpertsBackend = "auto",
    ) -> None:
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"GroupedExperts: activation must be 'swiglu' or 'gelu', got {activation!r}")
        self.num_local_experts = num_local_experts
        self.num_experts = num_experts if num_experts is not None else num_local_experts
        self.first_expert = first_expert
        if not 0 <= first_expert <= self.num_experts - num_local_experts:
            raise ValueError(
                f"GroupedExperts: local experts [{first_expert}, {first_expert + num_local_experts}) "
                f"outside the {self.num_experts} global experts"
            )
        self.hidden, self.ffn_hidden, self.activation = hidden, ffn_hidden, activation
        self.backend: ExpertsBackend = backend
        self.cpu_matmul: CpuMatmul = cpu_matmul
        self.fused_kernels: FusedKernels = fused_kernels
        self.init_std = init_std
        self.out_std = out_std if out_std is not None else init_std / math.sqrt(2.0)
        e, H, Fh = num_local_experts, hidden, ffn_hidden
        self.w13_eHG = nn.Parameter(torch.empty(e, H, 2 * Fh if activation == "swiglu" else Fh))
        self.w2_eFH = nn.Parameter(torch.empty(e, Fh, H))
        for p in self.parameters():
            p.expert_parallel = True  # type: ignore[attr-defined]
        self.reset_parameters()
        self.split_pairs = ("w13_eHG",) if activation == "swiglu" else ()  # split_layout.py
        join_on_load(self)  # state dicts of the split layout load too

    @property
    def w1_eHF(self) -> torch.Tensor:
        """The gate (SwiGLU) or only (GELU) input projection: a view of ``w13_eHG``."""
        return self.w13_eHG[..., : self.ffn_hidden]

    @property
    def w3_eHF(self) -> torch.Tensor | None:
        """SwiGLU's up projection, a view of ``w13_eHG``'s right half; None for GELU."""
        return self.w13_eHG[..., self.ffn_hidden :] if self.activation == "swiglu" else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        local = slice(self.first_expert, self.first_expert + self.num_local_experts)
        weights = [(self.w1_eHF, self.init_std), (self.w3_eHF, self.init_std), (self.w2_eFH, self.out_std)]
        for w, std in weights:  # w1 and w3 are views of w13: each half is drawn as before
            if w is None:
                continue
            for g in range(self.num_experts):  # one expert at a time: peak memory is one expert
                draw = torch.empty(w.shape[1:], dtype=torch.float32).normal_(0.0, std)
                if local.start <= g < local.stop:
                    w[g - local.start].copy_(draw)

    def forward(
        self, x_XH: torch.Tensor, tokens_per_expert_e: torch.Tensor, scale_X: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``tokens_per_expert_e`` may live on the device: grouped_mm reads it there (no host
        synchronisation); the per-expert loop copies it to the host. ``scale_X``: optional
        per-row routing weights, applied to the activation (differentiable). The output is in
        the compute dtype (step 1 of the module docstring)."""
        dt = compute_dtype(x_XH)
        x_XH = x_XH.to(dt)
        w13, w2 = cast_weight(self.w13_eHG, dt), cast_weight(self.w2_eFH, dt)
        if self.use_grouped_mm(x_XH):
            return grouped_expert_mlp(x_XH, w13, w2, tokens_per_expert_e, scale_X, self.fused_kernels)
        counts = tokens_per_expert_e.tolist()
        return expert_mlp(x_XH, w13, w2, counts, self.cpu_matmul, scale_X, self.fused_kernels)

    def use_grouped_mm(self, x_XH: torch.Tensor) -> bool:
        """grouped_mm on CUDA where it works (bf16, aligned). On CPU, grouped_mm is itself a loop
        of per-expert GEMMs, and ``expert_mlp`` is faster there: oneDNN GEMMs, intermediates of
        one expert's size (they reuse allocator memory instead of page-faulting fresh [X, F]
        buffers each step), fewer saved activations (tools/bench_layer_cpu.py; set
        ``backend`` to compare)."""
        wanted = {"auto": x_XH.device.type == "cuda", "grouped_mm": True, "loop": False}[self.backend]
        return (
            wanted
            and _aligned(x_XH, self.hidden, self.ffn_hidden)
            and grouped_experts_work(x_XH.device, x_XH.dtype)
        )

    def extra_repr(self) -> str:
        return (
            f"experts={self.first_expert}..{self.first_expert + self.num_local_experts - 1} "
            f"of {self.num_experts}, "
            f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, activation={self.activation}"
        )


def _aligned(x_XH: torch.Tensor, hidden: int, ffn_hidden: int) -> bool:
    """grouped_mm wants 16-byte aligned row strides (CPU and CUDA alike)."""
    per16 = 16 // x_XH.element_size()
    return hidden % per16 == 0 and ffn_hidden % per16 == 0


class SharedExperts(nn.Module):
    """``count`` dense SwiGLU experts applied to every token, their outputs summed (DeepSeek).

    ``count`` experts of hidden size F summed equal one SwiGLU MLP of hidden size Fs = count * F,
    so they are stored and computed as that one MLP: ``w13_HG`` = [w1 | w3] ([H, 2Fs], one GEMM
    for gate and up, as the routed experts) and ``w2_FH``. Replicated like any dense weight (no
    ``expert_parallel`` mark). Init draws w1, then w3, then w2, as the earlier split layout did.
    """

    def __init__(
        self, count: int, hidden: int, ffn_hidden: int, init_std: float = 0.02, out_std: float | None = None
    ) -> None:
        super().__init__()
        self.count = count
        self.ffn_hidden = Fs = count * ffn_hidden
        self.w13_HG = nn.Parameter(torch.empty(hidden, 2 * Fs))
        self.w2_FH = nn.Parameter(torch.empty(Fs, hidden))
        with torch.no_grad():
            self.w13_HG[:, :Fs].copy_(torch.empty(hidden, Fs).normal_(0.0, init_std))
            self.w13_HG[:, Fs:].copy_(torch.empty(hidden, Fs).normal_(0.0, init_std))
            self.w2_FH.normal_(0.0, out_std if out_std is not None else init_std / math.sqrt(2.0))
        self.split_pairs = ("w13_HG",)  # split_layout.py
        join_on_load(self)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """In the compute dtype (see ``GroupedExperts``), like the routed experts' output."""
        dt = compute_dtype(x_TH)
        h_TG = x_TH.to(dt) @ cast_weight(self.w13_HG, dt)
        h1_TF, h3_TF = h_TG.chunk(2, dim=-1)
        return (F.silu(h1_TF) * h3_TF) @ cast_weight(self.w2_FH, dt)
