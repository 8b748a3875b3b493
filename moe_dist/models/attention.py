"""Causal self-attention with rotary position embeddings (RoPE, Su et al. 2021).

Shape legend: B batch, S sequence (new positions), P cached + new positions, H model dim,
N query heads, G key/value heads (grouped-query attention, N = G * r), D head dim (H / N unless
``model.head_dim`` sets it: Qwen3-30B-A3B has H 2048, N 32, D 128).

Forward:
1. q, k, v = x @ Wq, x @ Wk, x @ Wv (one fused ``wqkv`` matrix: N, G, G heads of D rows each),
   split into heads.
2. With ``model.qk_norm`` (Qwen3): RMSNorm over the head dim of q and of k.
3. Rotate q and k by position (RoPE, the half-split "NeoX" layout Llama/Mixtral/Qwen use); with a
   ``KVCache`` the new positions start after the cached ones, and k, v join the cache.
4. Each of the G key/value heads serves r = N / G consecutive query heads.
5. Causal attention via ``F.scaled_dot_product_attention`` (flash/efficient kernels on GPU);
   with a document mask (``data.document_mask``) ``mask_B1SS`` also stops attention at document
   boundaries (block-diagonal causal, ``document_mask``).
6. Merge heads, project back with Wo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.models.norm import RMSNorm


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[S, D/2]`` for positions 0..S-1 (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles_SD = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles_SD.cos().float(), angles_SD.sin().float()


def document_mask(doc_BS: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S]`` booleans, True where query i may attend key j: j <= i, same document.

    A dense mask: SDPA cannot use its flash kernel with it (the memory-efficient or math kernel
    runs), and it holds B * S * S booleans; a block-sparse kernel (flex attention) would skip
    the masked blocks instead of computing them.
    """
    S = doc_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_BS.device).tril()
    same_doc_BSS = doc_BS[:, :, None] == doc_BS[:, None, :]
    return (same_doc_BSS & causal_SS)[:, None]


def apply_rope(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) by the angle of their position (row s of the tables for x's s)."""
    S = x_BNSD.shape[-2]
    cos, sin = cos_SD[:S].to(x_BNSD.dtype), sin_SD[:S].to(x_BNSD.dtype)
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class KVCache:
    """One layer's keys and values of the positions seen so far (generation): ``[B, G, P, D]``."""

    k_BGPD: torch.Tensor | None = None
    v_BGPD: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BGPD is None else self.k_BGPD.shape[2]

    def extend(self, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_BGPD is not None and self.v_BGPD is not None:
            k_BGSD, v_BGSD = torch.cat([self.k_BGPD, k_BGSD], dim=2), torch.cat([self.v_BGPD, v_BGSD], dim=2)
        self.k_BGPD, self.v_BGPD = k_BGSD, v_BGSD
        return k_BGSD, v_BGSD


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        max_seq_len: int,
        rope_theta: float,
        out_std: float,
        n_kv_heads: int | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim or dim // n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.wqkv = nn.Linear(dim, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        nn.init.normal_(self.wqkv.weight, std=0.02)
        nn.init.normal_(self.wo.weight, std=out_std)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        cos, sin = rope_tables(max_seq_len, self.head_dim, rope_theta)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("rope_cos_SD", cos, persistent=False)
        self.register_buffer("rope_sin_SD", sin, persistent=False)

    def forward(
        self, x_BSH: torch.Tensor, mask_B1SS: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        N, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x_BSH).split([N * D, G * D, G * D], dim=-1)
        q_BSND, k_BSGD = q.view(B, S, N, D), k.view(B, S, G, D)
        if self.q_norm is not None and self.k_norm is not None:
            q_BSND, k_BSGD = self.q_norm(q_BSND), self.k_norm(k_BSGD)
        past = 0 if cache is None else cache.length
        cos_SD, sin_SD = self.rope_cos_SD[past : past + S], self.rope_sin_SD[past : past + S]
        q_BNSD = apply_rope(q_BSND.transpose(1, 2), cos_SD, sin_SD)
        k_BGPD = apply_rope(k_BSGD.transpose(1, 2), cos_SD, sin_SD)
        v_BGPD = v.view(B, S, G, D).transpose(1, 2)
        if cache is not None:
            k_BGPD, v_BGPD = cache.extend(k_BGPD, v_BGPD)
        if G != N:
            k_BNPD, v_BNPD = k_BGPD.repeat_interleave(N // G, dim=1), v_BGPD.repeat_interleave(N // G, dim=1)
        else:
            k_BNPD, v_BNPD = k_BGPD, v_BGPD
        if mask_B1SS is not None:
            o_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNPD, v_BNPD, attn_mask=mask_B1SS)
        elif past == 0:
            o_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNPD, v_BNPD, is_causal=True)
        else:  # new positions after cached ones: query i sees every key up to past + i
            P = past + S
            allowed_SP = torch.ones(S, P, dtype=torch.bool, device=x_BSH.device).tril(diagonal=past)
            o_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNPD, v_BNPD, attn_mask=allowed_SP)
        return self.wo(o_BNSD.transpose(1, 2).reshape(B, S, N * D))


def residual_out_std(n_layers: int, base: float = 0.02) -> float:
    """GPT-2's scaled init for projections that feed the residual stream: 0.02 / sqrt(2 L)."""
    return base / math.sqrt(2 * n_layers)
