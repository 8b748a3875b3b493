"""Our parameters under the Hugging Face names and layouts: ONE table, read by export and import.

``tensor_links(model_cfg, arch)`` lists every tensor of ``model.safetensors`` as a `TensorLink`:
its Hugging Face name, the state-dict key of ours that holds it, which part of that tensor
(``index``) and whether the last two axes are swapped (``transpose``). Export copies
``link.view(ours)`` out (``hf_state_dict``); import (``hf_import_weights``) copies the file's
tensor into the same view of a fresh model, so the two directions cannot drift apart.

Written in the Hub's per-expert layout (``mistralai/Mixtral-8x7B-v0.1``, ``Qwen/Qwen3-30B-A3B``):
``transformers`` 4.x loads it as it is, and 5.x fuses it at load time into its
``experts.gate_up_proj [E, 2F, H]`` / ``experts.down_proj [E, H, F]`` (``conversion_mapping.py``:
``mixtral`` and ``qwen2_moe`` entries), as it does for the Hub's own files, and writes it back
in this layout on ``save_pretrained``; vLLM and the llama.cpp converters read the same layout.

Shape legend: E experts, H model dim, F expert (or dense) FFN hidden size, N query heads,
G key/value heads, D head dim, V vocabulary.

Ours -> theirs (``blocks.{i}.`` -> ``model.layers.{i}.`` prefix on the per-layer names;
``nn.Linear`` weights are ``[out, in]`` on both sides):

- ``embed.weight [V, H]`` -> ``model.embed_tokens.weight``; ``norm`` -> ``model.norm``;
  ``output.weight`` -> ``lm_head.weight`` (absent when tied: ``tie_word_embeddings``).
- ``attn_norm`` -> ``input_layernorm``; ``ffn_norm`` -> ``post_attention_layernorm``.
- ``attn.wqkv.weight [(N + 2G) D, H]`` rows [0, ND), [ND, ND + GD), [ND + GD, ND + 2GD) ->
  ``self_attn.q_proj``, ``k_proj``, ``v_proj``; ``attn.wo`` -> ``self_attn.o_proj``;
  ``attn.q_norm`` / ``k_norm`` -> ``self_attn.q_norm`` / ``k_norm`` (Qwen3). No permutation of
  q/k rows: our RoPE rotates the pairs (x_i, x_{i + D/2}), the half-split layout of HF's
  ``rotate_half``.
- router ``ffn.gate.router.weight [E, H]`` -> ``block_sparse_moe.gate.weight`` (Mixtral) /
  ``mlp.gate.weight`` (Qwen3).
- experts ``w13_eHG[j, :, :F]^T`` (w1, the gate), ``w13_eHG[j, :, F:]^T`` (w3, up) ``[F, H]``
  and ``w2_eFH[j]^T`` ``[H, F]`` -> ``block_sparse_moe.experts.{j}.w1/w3/w2.weight`` (Mixtral) /
  ``mlp.experts.{j}.gate_proj/up_proj/down_proj.weight`` (Qwen3): HF's gate is w1 (silu), up is w3.
- ``qwen3_moe_lpr`` (remote code): the LPR router and transformers 5's fused experts,
  ``experts.gate_up_proj = w13_eHG^T`` and ``experts.down_proj = w2_eFH^T`` (``hf_lpr``).
- dense FFN (our ``dense_layers`` prefix, Qwen3 only) ``w1/w3/w2`` -> ``mlp.gate_proj/up_proj/down_proj``.

Every exported tensor is a contiguous fp32 copy (safetensors refuses shared storage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_dist.config import ModelConfig
from moe_dist.export.hf_lpr import lpr_router_links
from moe_dist.export.hf_support import Arch
from moe_dist.models.transformer import MoETransformer

# The names of one expert's three projections, and of the MoE block, per target.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
_MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp", "qwen3_moe_lpr": "mlp"}
ROUTER_PART = ".ffn.gate.router."  # in our names: what ``import-hf --router`` initialises afresh

Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class TensorLink:
    """One tensor of ``model.safetensors`` and where it lives in our state dict."""

    hf: str  # name in model.safetensors
    ours: str  # our state-dict key
    index: Index = ()  # the part of ours it is (rows of wqkv, one expert's half of w13, ...)
    transpose: bool = False  # HF's tensor is that part with its last two axes swapped

    def view(self, ours_t: torch.Tensor) -> torch.Tensor:
        """The part of ``ours_t`` in HF's shape: a view, so import can ``copy_`` into it."""
        part = ours_t[self.index] if self.index else ours_t
        return part.transpose(-2, -1) if self.transpose else part


def tensor_links(model: ModelConfig, arch: Arch) -> list[TensorLink]:
    """Every tensor of ``model`` as ``arch`` (an EP=1 model: every expert), in file order."""
    links = [TensorLink("model.embed_tokens.weight", "embed.weight")]
    for i in range(model.n_layers):
        links += _block_links(model, arch, i)
    links.append(TensorLink("model.norm.weight", "norm.weight"))
    if not model.tie_embeddings:
        links.append(TensorLink("lm_head.weight", "output.weight"))
    return links


def _block_links(model: ModelConfig, arch: Arch, i: int) -> list[TensorLink]:
    theirs, ours = f"model.layers.{i}.", f"blocks.{i}."
    N = model.n_heads
    G, D = model.n_kv_heads or N, model.head_dim or model.dim // N
    wqkv = f"{ours}attn.wqkv.weight"
    links = [
        TensorLink(f"{theirs}input_layernorm.weight", f"{ours}attn_norm.weight"),
        TensorLink(f"{theirs}self_attn.q_proj.weight", wqkv, (slice(0, N * D),)),
        TensorLink(f"{theirs}self_attn.k_proj.weight", wqkv, (slice(N * D, (N + G) * D),)),
        TensorLink(f"{theirs}self_attn.v_proj.weight", wqkv, (slice((N + G) * D, (N + 2 * G) * D),)),
        TensorLink(f"{theirs}self_attn.o_proj.weight", f"{ours}attn.wo.weight"),
    ]
    if model.qk_norm:
        links.append(TensorLink(f"{theirs}self_attn.q_norm.weight", f"{ours}attn.q_norm.weight"))
        links.append(TensorLink(f"{theirs}self_attn.k_norm.weight", f"{ours}attn.k_norm.weight"))
    links.append(TensorLink(f"{theirs}post_attention_layernorm.weight", f"{ours}ffn_norm.weight"))
    if i < model.dense_layers:
        for hf_name, our_name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            links.append(TensorLink(f"{theirs}mlp.{hf_name}.weight", f"{ours}ffn.{our_name}.weight"))
        return links
    moe, experts = f"{theirs}{_MOE_PREFIX[arch]}.", f"{ours}ffn.experts."
    if arch == "qwen3_moe_lpr":  # LPR router, fused experts (remote code: hf_lpr)
        links += [TensorLink(h, o) for h, o in lpr_router_links(f"{moe}gate.", f"{ours}ffn.gate.router.")]
        links.append(TensorLink(f"{moe}experts.gate_up_proj", f"{experts}w13_eHG", transpose=True))
        links.append(TensorLink(f"{moe}experts.down_proj", f"{experts}w2_eFH", transpose=True))
        return links
    links.append(TensorLink(f"{moe}gate.weight", f"{ours}ffn.gate.router.weight"))
    F_ = model.moe.experts.ffn_hidden_size
    gate_name, up_name, down_name = _EXPERT_NAMES[arch]
    for j in range(model.moe.num_experts):
        hf_j = f"{moe}experts.{j}."
        links += [
            TensorLink(
                f"{hf_j}{gate_name}.weight", f"{experts}w13_eHG", (j, slice(None), slice(0, F_)), True
            ),
            TensorLink(
                f"{hf_j}{up_name}.weight", f"{experts}w13_eHG", (j, slice(None), slice(F_, 2 * F_)), True
            ),
            TensorLink(f"{hf_j}{down_name}.weight", f"{experts}w2_eFH", (j,), True),
        ]
    return links


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def hf_state_dict(model: MoETransformer, arch: Arch) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` for ``model`` (EP=1: every expert present) as ``arch``."""
    for layer in model.moe_layers():
        experts = layer.experts  # type: ignore[attr-defined]
        if experts.num_local_experts != experts.num_experts or experts.w3_eHF is None:
            raise ValueError("hf_state_dict: needs an EP=1 model with SwiGLU experts")
    state = model.state_dict()
    return {link.hf: _copy(link.view(state[link.ours])) for link in tensor_links(model.cfg, arch)}
