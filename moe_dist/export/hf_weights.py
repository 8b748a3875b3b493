"""Our parameters under the Hugging Face names and layouts (the contents of ``model.safetensors``).

Written in the Hub's per-expert layout (``mistralai/Mixtral-8x7B-v0.1``, ``Qwen/Qwen3-30B-A3B``):
``transformers`` 4.x loads it as it is, and 5.x fuses it at load time into its
``experts.gate_up_proj [E, 2F, H]`` / ``experts.down_proj [E, H, F]`` (``conversion_mapping.py``:
``mixtral`` and ``qwen2_moe`` entries), as it does for the Hub's own files; vLLM and the llama.cpp
converters read the same layout.

Shape legend: E experts, H model dim, F expert (or dense) FFN hidden size, N query heads,
G key/value heads, D head dim, V vocabulary.

Ours -> theirs (``model.layers.{i}.`` prefix on the per-layer names; ``nn.Linear`` weights are
``[out, in]`` on both sides):

- ``embed.weight [V, H]`` -> ``model.embed_tokens.weight``; ``norm`` -> ``model.norm``;
  ``output.weight`` -> ``lm_head.weight`` (absent when tied: ``tie_word_embeddings``).
- ``attn_norm`` -> ``input_layernorm``; ``ffn_norm`` -> ``post_attention_layernorm``.
- ``attn.wqkv.weight [(N + 2G) D, H]`` split by rows [N D, G D, G D] -> ``self_attn.q_proj``,
  ``k_proj``, ``v_proj``; ``attn.wo`` -> ``self_attn.o_proj``; ``attn.q_norm`` / ``k_norm`` ->
  ``self_attn.q_norm`` / ``k_norm`` (Qwen3). No permutation of q/k rows: our RoPE rotates the
  pairs (x_i, x_{i + D/2}), the half-split layout of HF's ``rotate_half``.
- router ``ffn.gate.router.weight [E, H]`` -> ``block_sparse_moe.gate.weight`` (Mixtral) /
  ``mlp.gate.weight`` (Qwen3).
- experts ``w1_eHF[j]^T``, ``w3_eHF[j]^T`` ``[F, H]`` and ``w2_eFH[j]^T`` ``[H, F]`` ->
  ``block_sparse_moe.experts.{j}.w1/w3/w2.weight`` (Mixtral) /
  ``mlp.experts.{j}.gate_proj/up_proj/down_proj.weight`` (Qwen3): HF's gate is w1 (silu), up is w3.
- ``qwen3_moe_lpr`` (remote code): the LPR router and fused experts, see ``hf_lpr``.
- dense FFN (our ``dense_layers`` prefix, Qwen3 only) ``w1/w3/w2`` -> ``mlp.gate_proj/up_proj/down_proj``.

Every tensor is a contiguous fp32 copy (safetensors refuses shared storage).
"""

from __future__ import annotations

import torch

from moe_dist.export.hf_lpr import lpr_moe_tensors
from moe_dist.export.hf_support import Arch
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.models.transformer import Block, DenseFFN, MoETransformer

# The names of one expert's three projections, and of the MoE block, per target.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
_MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp", "qwen3_moe_lpr": "mlp"}


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def hf_state_dict(model: MoETransformer, arch: Arch) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` for ``model`` (EP=1: every expert present) as ``arch``."""
    out = {
        "model.embed_tokens.weight": _copy(model.embed.weight),
        "model.norm.weight": _copy(model.norm.weight),
    }
    if model.output is not None:
        out["lm_head.weight"] = _copy(model.output.weight)
    for i, block in enumerate(model.blocks):
        out |= _block_tensors(block, f"model.layers.{i}.", arch)
    return out


def _block_tensors(block: Block, prefix: str, arch: Arch) -> dict[str, torch.Tensor]:
    attn = block.attn
    N, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q_ND_H, k_GD_H, v_GD_H = attn.wqkv.weight.split([N * D, G * D, G * D], dim=0)
    out = {
        f"{prefix}input_layernorm.weight": _copy(block.attn_norm.weight),
        f"{prefix}post_attention_layernorm.weight": _copy(block.ffn_norm.weight),
        f"{prefix}self_attn.q_proj.weight": _copy(q_ND_H),
        f"{prefix}self_attn.k_proj.weight": _copy(k_GD_H),
        f"{prefix}self_attn.v_proj.weight": _copy(v_GD_H),
        f"{prefix}self_attn.o_proj.weight": _copy(attn.wo.weight),
    }
    if attn.q_norm is not None and attn.k_norm is not None:
        out[f"{prefix}self_attn.q_norm.weight"] = _copy(attn.q_norm.weight)
        out[f"{prefix}self_attn.k_norm.weight"] = _copy(attn.k_norm.weight)
    ffn = block.ffn
    if isinstance(ffn, DenseFFN):
        out[f"{prefix}mlp.gate_proj.weight"] = _copy(ffn.w1.weight)
        out[f"{prefix}mlp.up_proj.weight"] = _copy(ffn.w3.weight)
        out[f"{prefix}mlp.down_proj.weight"] = _copy(ffn.w2.weight)
        return out
    if not isinstance(ffn, MoELayer):
        raise TypeError(f"{prefix}: cannot export an FFN of type {type(ffn).__name__}")
    moe = f"{prefix}{_MOE_PREFIX[arch]}."
    experts = ffn.experts
    if experts.num_local_experts != experts.num_experts or experts.w3_eHF is None:
        raise ValueError("hf_state_dict: needs an EP=1 model with SwiGLU experts")
    if arch == "qwen3_moe_lpr":  # LPR router, fused experts (remote code: hf_lpr)
        return out | lpr_moe_tensors(ffn, moe, _copy)
    out[f"{moe}gate.weight"] = _copy(ffn.gate.router.weight_EH)
    gate_name, up_name, down_name = _EXPERT_NAMES[arch]
    for j in range(experts.num_experts):
        out[f"{moe}experts.{j}.{gate_name}.weight"] = _copy(experts.w1_eHF[j].T)
        out[f"{moe}experts.{j}.{up_name}.weight"] = _copy(experts.w3_eHF[j].T)
        out[f"{moe}experts.{j}.{down_name}.weight"] = _copy(experts.w2_eFH[j].T)
    return out
