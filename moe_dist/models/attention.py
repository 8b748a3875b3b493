"""Causal self-attention with rotary position embeddings (RoPE, Su et al. 2021).

Shape legend: B batch, S sequence, H model dim, N heads, D head dim (H = N * D).

Forward:
1. q, k, v = x @ Wq, x @ Wk, x @ Wv, split into N heads of D.
2. Rotate q and k by position (RoPE, the half-split "NeoX" layout Llama/Mixtral/Qwen use).
3. Causal attention via ``F.scaled_dot_product_attention`` (flash/efficient kernels on GPU).
4. Merge heads, project back with Wo.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[S, D/2]`` for positions 0..S-1 (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles_SD = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles_SD.cos().float(), angles_SD.sin().float()


def apply_rope(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) by the angle of their position."""
    S = x_BNSD.shape[-2]
    cos, sin = cos_SD[:S].to(x_BNSD.dtype), sin_SD[:S].to(x_BNSD.dtype)
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, max_seq_len: int, rope_theta: float, out_std: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.wqkv.weight, std=0.02)
        nn.init.normal_(self.wo.weight, std=out_std)
        cos, sin = rope_tables(max_seq_len, self.head_dim, rope_theta)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("rope_cos_SD", cos, persistent=False)
        self.register_buffer("rope_sin_SD", sin, persistent=False)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        qkv = self.wqkv(x_BSH).view(B, S, 3, self.n_heads, self.head_dim)
        q_BNSD, k_BNSD, v_BNSD = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        q_BNSD = apply_rope(q_BNSD, self.rope_cos_SD, self.rope_sin_SD)
        k_BNSD = apply_rope(k_BNSD, self.rope_cos_SD, self.rope_sin_SD)
        o_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, is_causal=True)
        return self.wo(o_BNSD.transpose(1, 2).reshape(B, S, H))


def residual_out_std(n_layers: int, base: float = 0.02) -> float:
    """GPT-2's scaled init for projections that feed the residual stream: 0.02 / sqrt(2 L)."""
    return base / math.sqrt(2 * n_layers)
