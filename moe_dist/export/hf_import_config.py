"""A Hugging Face checkpoint's ``config.json`` as our ``model`` section, or a refusal naming what we lack.

The inverse of ``hf_config``: the one-to-one fields are read through the same table
(``hf_config.config_fields``); the rest is written out here, beside what export writes:

- ``num_key_value_heads`` -> ``n_kv_heads`` (None when it equals ``num_attention_heads``);
- ``head_dim`` -> ``model.head_dim`` when it is not ``hidden_size / num_attention_heads``;
- Mixtral: ``renormalize: true`` (``MixtralTopKRouter`` always renormalises), no QK-norm,
  every layer MoE; Qwen3-MoE: QK-norm, ``norm_topk_prob`` -> ``renormalize``, the dense layers
  (``mlp_only_layers``, and the layers ``decoder_sparse_step`` skips) must be a prefix
  [0 .. N-1] -> ``dense_layers: N`` with ``intermediate_size``;
- ``qwen3_moe_lpr`` (moe-dist's own LPR export, ``hf_lpr``): the Qwen3 fields plus the
  ``lpr`` router (``lpr_latent_dim``, ``lpr_add_decoded_latent``; ``lpr_layer_norm_eps`` must be
  nn.LayerNorm's 1e-5, as our router builds it);
- router options and losses: a config.json written by ``moe-dist export-hf`` carries the run's
  router and losses under ``moe_dist``, and they come back (top-k and renormalisation from the
  HF fields); otherwise ``router_aux_loss_coef`` > 0 becomes our ``switch`` loss with
  ``scope: model`` and ``normalize: tokens``: Hugging Face's ``load_balancing_loss_func`` (one
  Switch loss over all layers' routing, f = counts / tokens), which ``transformers`` adds when
  fine-tuning with ``output_router_logits``. ``--set model.moe.losses=[]`` trains without it.

Refused, each by name with the reason, all in one line (``HFImportError``, exit 2): another
architecture (a few known MoE ones with what we lack), an
activation other than SiLU, a sliding window shorter than the context (Mixtral
``sliding_window``, Qwen3 ``use_sliding_window``), RoPE scaling (``rope_scaling`` /
``rope_parameters.rope_type`` other than default, ``partial_rotary_factor``), biases
(``attention_bias``, ``mlp_bias``), quantised checkpoints, dense layers that are not a prefix.
Not carried over, and said so (training-time only): Mixtral's ``router_jitter_noise`` (it also
scales the experts' input, ours only the router's: ``model.moe.router.jitter_eps`` is ours) and
``attention_dropout`` (we have none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_dist.export.hf_config import config_fields
from moe_dist.export.hf_lpr import LAYER_NORM_EPS
from moe_dist.export.hf_support import Arch, ExportError

SOURCES: dict[str, Arch] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3MoeLPRForCausalLM": "qwen3_moe_lpr",
}
# Known MoE architectures we cannot express, and the part we lack.
OTHERS = {
    "Qwen2MoeForCausalLM": "its shared expert is scaled by a sigmoid gate (shared_expert_gate) "
    "that our shared experts do not have",
    "DeepseekV3ForCausalLM": "sigmoid scores with group-limited top-k and a routed scaling factor, "
    "and multi-head latent attention",
    "OlmoeForCausalLM": "its QK-norm normalises the whole q and k projections, ours each head",
    "GptOssForCausalLM": "biases in the experts and router, attention sinks and sliding-window layers",
}
ROPE_DEFAULTS = {"mixtral": 1e6, "qwen3_moe": 1e4, "qwen3_moe_lpr": 1e4}  # MixtralConfig, Qwen3MoeConfig


class HFImportError(ExportError):
    """The checkpoint cannot be imported as asked (one line: what, and why); the CLI exits 2."""


@dataclass
class HFSource:
    """What ``config.json`` says: the architecture, our model section (a dict), and notes."""

    arch: Arch
    config: dict[str, Any]
    model: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    tokenizer_kind: str | None = None  # "bytes" for moe-dist's own byte-tokenizer exports


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFImportError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HFImportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path}: top level must be an object")
    return config


def source_arch(config: dict[str, Any], where: Path) -> Arch:
    names = config.get("architectures") or []
    name = names[0] if isinstance(names, list) and len(names) == 1 else None
    if name in SOURCES:
        return SOURCES[name]
    if not names and config.get("model_type") in ("mixtral", "qwen3_moe"):
        return config["model_type"]
    why = f": {OTHERS[name]}" if name in OTHERS else ""
    raise HFImportError(
        f"{where}: architectures {names!r}{why}; import-hf reads {', '.join(SOURCES)} "
        "(the last one: moe-dist's own LPR export)"
    )


def _get(config: dict[str, Any], key: str, arch: Arch, problems: list[str]) -> Any:
    """``config[key]``, through the spellings transformers writes (``rope_parameters``, the
    ``num_experts`` <-> ``num_local_experts`` attribute map); a missing key is a problem."""
    if key in config and config[key] is not None:
        return config[key]
    if key == "rope_theta":
        rope = config.get("rope_parameters") or {}
        return rope.get("rope_theta", ROPE_DEFAULTS[arch])
    if key == "num_experts" and config.get("num_local_experts") is not None:
        return config["num_local_experts"]
    if key == "tie_word_embeddings":
        return False  # the default of both config classes
    problems.append(f"no {key}")
    return None


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def model_section(hf_dir: Path) -> HFSource:
    """``config.json`` of ``hf_dir`` as our ``model`` section; ``HFImportError`` names every problem."""
    config = read_config(hf_dir)
    arch = source_arch(config, hf_dir / "config.json")
    problems: list[str] = []
    model: dict[str, Any] = {}
    for ours, theirs in config_fields(arch):
        _set(model, ours, _get(config, theirs, arch, problems))
    if problems:
        raise HFImportError(f"{hf_dir / 'config.json'}: " + "; ".join(problems))
    source = HFSource(arch, config, model)
    heads, kv = model["n_heads"], config.get("num_key_value_heads") or model["n_heads"]
    model["n_kv_heads"] = kv if kv != heads else None
    model["qk_norm"] = arch != "mixtral"
    model["moe"]["experts"]["activation"] = "swiglu"
    problems += _common_problems(config, model)
    if arch == "mixtral":
        problems += _mixtral(source)
    else:
        problems += _qwen3(source)
    if problems:
        raise HFImportError(f"cannot import {hf_dir} as {arch}: " + "; ".join(problems))
    _router_and_losses(source)
    return source


def _common_problems(config: dict[str, Any], model: dict[str, Any]) -> list[str]:
    problems = []
    H, N = model["dim"], model["n_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and (H % N or head_dim != H // N):
        model["head_dim"] = head_dim  # Qwen3-30B-A3B: 128 at hidden 2048, 32 heads
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act: {config['hidden_act']}; our experts are SwiGLU (silu gate)")
    rope_types = {
        (config.get("rope_scaling") or {}).get("rope_type"),
        (config.get("rope_scaling") or {}).get("type"),
        (config.get("rope_parameters") or {}).get("rope_type"),
    } - {None, "default"}
    if rope_types:
        problems.append(f"RoPE scaling {sorted(rope_types)}: our RoPE is the default one (theta only)")
    rope = config.get("rope_parameters") or {}
    partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor: {partial}; our RoPE rotates the whole head")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key}: true; our projections have no biases")
    if config.get("quantization_config"):
        method = (config["quantization_config"] or {}).get("quant_method", "?")
        problems.append(f"quantization_config ({method}): quantised weights; dequantise to float first")
    return problems


def _mixtral(source: HFSource) -> list[str]:
    config, model = source.config, source.model
    problems = []
    window, context = config.get("sliding_window"), model["max_seq_len"]
    if window is not None and window < context:
        problems.append(
            f"sliding_window: {window} < max_position_embeddings {context}; our attention has no "
            "sliding window (it attends to the whole sequence)"
        )
    top_k = model["moe"]["router"]["top_k"]
    model["moe"]["router"] = {"name": "topk_softmax", "top_k": top_k, "renormalize": True}  # always
    if config.get("router_jitter_noise"):
        source.notes.append(
            f"router_jitter_noise {config['router_jitter_noise']} not carried over (training only; Mixtral's "
            "jitter scales the experts' input too): set model.moe.router.jitter_eps for ours"
        )
    _dropout_note(source)
    return problems


def _qwen3(source: HFSource) -> list[str]:
    config, model, arch = source.config, source.model, source.arch
    problems = []
    if config.get("use_sliding_window"):
        problems.append(
            f"use_sliding_window: true (sliding_window {config.get('sliding_window')}); our attention "
            "has no sliding window"
        )
    n, step = model["n_layers"], config.get("decoder_sparse_step") or 1
    only = set(config.get("mlp_only_layers") or [])
    dense = [i for i in range(n) if i in only or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        problems.append(
            f"dense layers {dense} (mlp_only_layers, decoder_sparse_step {step}) are not the first "
            "layers; ours are a prefix (model.dense_layers)"
        )
    model["dense_layers"] = len(dense)
    top_k = model["moe"]["router"]["top_k"]
    if arch == "qwen3_moe_lpr":
        eps = config.get("lpr_layer_norm_eps", LAYER_NORM_EPS)
        if eps != LAYER_NORM_EPS:
            problems.append(f"lpr_layer_norm_eps: {eps}; our LPR router's LayerNorm uses {LAYER_NORM_EPS}")
        model["moe"]["router"] = {
            "name": "lpr",
            "top_k": top_k,
            "latent_dim": config.get("lpr_latent_dim"),
            "add_decoded_latent": bool(config.get("lpr_add_decoded_latent", True)),
        }
    else:
        renormalize = bool(config.get("norm_topk_prob", False))  # Qwen3MoeConfig's default
        model["moe"]["router"] = {"name": "topk_softmax", "top_k": top_k, "renormalize": renormalize}
    _dropout_note(source)
    return problems


def _dropout_note(source: HFSource) -> None:
    if source.config.get("attention_dropout"):
        source.notes.append(
            f"attention_dropout {source.config['attention_dropout']} not carried over (we have none)"
        )


def _router_and_losses(source: HFSource) -> None:
    """Router options and losses of a moe-dist export come back; else HF's loss (module docstring)."""
    moe, config = source.model["moe"], source.config
    ours = config.get("moe_dist") if isinstance(config.get("moe_dist"), dict) else {}
    saved_router = ours.get("router")
    if isinstance(saved_router, dict) and saved_router.get("name") == moe["router"]["name"]:
        moe["router"] = {**saved_router, **moe["router"]}  # the HF fields win
    if isinstance(ours.get("losses"), list):
        moe["losses"] = ours["losses"]
    else:
        coef = float(config.get("router_aux_loss_coef") or 0.0)
        moe["losses"] = (
            [{"name": "switch", "coef": coef, "scope": "model", "normalize": "tokens"}] if coef > 0 else []
        )
    if ours.get("tokenizer") == "bytes":
        source.tokenizer_kind = "bytes"
