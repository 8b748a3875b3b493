"""LPR runs as Hugging Face remote code (``--arch qwen3_moe_lpr``, the default for ``lpr`` routers).

The target is transformers' Qwen3-MoE with the sparse MoE block's router replaced by LPR's
(``remote_code/modeling_qwen3_moe_lpr.py``, copied into the output with its configuration file
and named in ``config.json``'s ``auto_map``); it loads with
``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` (transformers >= 5).
Everything but the MoE block is the ``qwen3_moe`` export (``hf_config``, ``hf_weights``); here:

- config: ``Qwen3MoeLPRForCausalLM``, ``model_type: qwen3_moe_lpr``, ``auto_map``,
  ``lpr_latent_dim`` (router.latent_dim), ``lpr_add_decoded_latent`` (router.add_decoded_latent),
  ``lpr_layer_norm_eps`` (1e-5, ``nn.LayerNorm``'s default that our router uses), and
  ``norm_topk_prob: false`` (LPR's top-k weights are a softmax over the k cosines already);
- weights, per MoE layer (``model.layers.{i}.mlp.`` prefix): router ``norm``, ``encoder``,
  ``out_proj`` (weight and bias) and ``expert_keys [E, D]`` -> ``gate.norm``, ``gate.encoder``,
  ``gate.out_proj``, ``gate.expert_keys``; experts in transformers 5's fused layout,
  ``experts.gate_up_proj [E, 2F, H]`` = [w1^T; w3^T] and ``experts.down_proj [E, H, F]`` = w2^T
  (transformers fuses the Hub's per-expert layout at load time only for its own model types, not
  for remote code). The EMA buffers are training state and are not exported.

Not carried over: LPR's regularisers (diversity, KL, alignment) and the EMA key update are
training-only; the remote code implements the inference forward (eval mode: mu, no sampling).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from moe_dist.config import ModelConfig
from moe_dist.export.remote_code import REMOTE_CODE_FILES

ARCH = "qwen3_moe_lpr"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as LPRRouter builds its norm


def lpr_config_fields(model: ModelConfig) -> dict[str, Any]:
    """The keys ``qwen3_moe_lpr`` adds to (or changes in) the ``qwen3_moe`` ``config.json``."""
    router = model.moe.router
    configuration, modeling = (Path(name).stem for name in REMOTE_CODE_FILES[ARCH])
    return {
        "auto_map": {
            "AutoConfig": f"{configuration}.Qwen3MoeLPRConfig",
            "AutoModel": f"{modeling}.Qwen3MoeLPRModel",
            "AutoModelForCausalLM": f"{modeling}.Qwen3MoeLPRForCausalLM",
        },
        "norm_topk_prob": False,
        "lpr_latent_dim": router.latent_dim,
        "lpr_add_decoded_latent": router.add_decoded_latent,
        "lpr_layer_norm_eps": LAYER_NORM_EPS,
    }


def lpr_router_links(hf_prefix: str, our_prefix: str) -> list[tuple[str, str]]:
    """(HF name, our name) of one LPR router's tensors: ``hf_prefix`` is ``model.layers.{i}.mlp.gate.``,
    ``our_prefix`` ``blocks.{i}.ffn.gate.router.`` (the fused experts are ``hf_weights``'s)."""
    out = [(f"{hf_prefix}expert_keys", f"{our_prefix}expert_keys")]
    for name in ("norm", "encoder", "out_proj"):
        out += [(f"{hf_prefix}{name}.{p}", f"{our_prefix}{name}.{p}") for p in ("weight", "bias")]
    return out


def write_remote_code(out_dir: Path) -> list[str]:
    """Copy the target's configuration and modeling files into ``out_dir``; their names."""
    package = files("moe_dist.export.remote_code")
    for name in REMOTE_CODE_FILES[ARCH]:
        (out_dir / name).write_text(package.joinpath(name).read_text(encoding="utf-8"), encoding="utf-8")
    return list(REMOTE_CODE_FILES[ARCH])
