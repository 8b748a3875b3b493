"""``config.json`` of the exported model, in the layout of the Hugging Face Hub's own checkpoints.

Source: ``MixtralConfig`` (``models/mixtral/configuration_mixtral.py``) and ``Qwen3MoeConfig``
(``models/qwen3_moe/configuration_qwen3_moe.py``); the keys are those of the Hub's
``mistralai/Mixtral-8x7B-v0.1`` and ``Qwen/Qwen3-30B-A3B`` config files, so that every
``transformers`` from 4.51 on reads them (``rope_theta`` at the top level, as 4.x wants it, and
``rope_parameters`` as 5.x names it).

Field by field (ours -> theirs), the one-to-one ones in ``CONFIG_FIELDS`` (which import reads
too, ``hf_import_config``): vocab_size; dim -> hidden_size; n_layers -> num_hidden_layers;
n_heads -> num_attention_heads; max_seq_len -> max_position_embeddings; norm_eps -> rms_norm_eps
(ours applies it to QK-norm too, as Qwen3 does); rope_theta; tie_embeddings ->
tie_word_embeddings; router.top_k -> num_experts_per_tok; moe.num_experts -> num_local_experts
(Mixtral) / num_experts (Qwen3); experts.ffn_hidden_size -> intermediate_size (Mixtral) /
moe_intermediate_size (Qwen3); dense_ffn_hidden_size -> intermediate_size (Qwen3). Written out
in both directions: n_kv_heads (or n_heads) -> num_key_value_heads; head_dim (or dim / n_heads) -> head_dim;
router.renormalize -> norm_topk_prob (Qwen3); dense_layers -> mlp_only_layers = [0 .. N-1].
``qwen3_moe_lpr`` is the Qwen3 config plus the LPR keys and ``auto_map`` of
``hf_lpr.lpr_config_fields``.

Metadata only (no effect on the forward): ``router_aux_loss_coef`` is the coefficient of our
``switch`` or ``global_batch`` loss (0 when the run used neither); ``transformers`` adds that
loss (its ``load_balancing_loss_func``, Switch-style over the whole batch and all layers) only
when fine-tuning with ``output_router_logits``, so it is not our training objective (which may
also hold z-loss, SimBal or sequence-wise terms; they are listed under ``moe_dist``).
``router_jitter_noise`` is 0 (see ``hf_support``). The ``moe_dist`` key records the run, step,
router and losses.
"""

from __future__ import annotations

from typing import Any

from moe_dist.config import ModelConfig
from moe_dist.export.hf_lpr import lpr_config_fields
from moe_dist.export.hf_support import Arch

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_moe_lpr": "Qwen3MoeLPRForCausalLM",
}

# (our ModelConfig field, dotted, HF config.json key): the fields that map one to one.
COMMON_FIELDS: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("dim", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("max_seq_len", "max_position_embeddings"),
    ("norm_eps", "rms_norm_eps"),
    ("rope_theta", "rope_theta"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("moe.router.top_k", "num_experts_per_tok"),
)
_QWEN3_FIELDS = (
    ("moe.num_experts", "num_experts"),
    ("moe.experts.ffn_hidden_size", "moe_intermediate_size"),
    ("dense_ffn_hidden_size", "intermediate_size"),
)
TARGET_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": (
        ("moe.num_experts", "num_local_experts"),
        ("moe.experts.ffn_hidden_size", "intermediate_size"),
    ),
    "qwen3_moe": _QWEN3_FIELDS,
    "qwen3_moe_lpr": _QWEN3_FIELDS,
}


def config_fields(arch: Arch) -> tuple[tuple[str, str], ...]:
    """(ours, theirs) pairs of ``arch``'s one-to-one fields."""
    return COMMON_FIELDS + TARGET_FIELDS[arch]


def field_value(model: ModelConfig, path: str) -> Any:
    """``model``'s value at a dotted path (``moe.router.top_k``)."""
    value: Any = model
    for part in path.split("."):
        value = getattr(value, part)
    return value


def aux_loss_coef(model: ModelConfig) -> float:
    """The coefficient of the Switch-style balancing loss (``switch`` or ``global_batch``), else 0."""
    for loss in model.moe.losses:
        if loss.name in ("switch", "global_batch"):
            return float(loss.coef)
    return 0.0


def hf_config(
    model: ModelConfig, arch: Arch, eos_token_id: int | None, provenance: dict[str, Any]
) -> dict[str, Any]:
    """The ``config.json`` dictionary of ``model`` as ``arch``; ``provenance`` goes under ``moe_dist``."""
    moe = model.moe
    common: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        **{theirs: field_value(model, ours) for ours, theirs in config_fields(arch)},
        "num_key_value_heads": model.n_kv_heads or model.n_heads,
        "head_dim": model.head_dim or model.dim // model.n_heads,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "output_router_logits": False,
        "router_aux_loss_coef": aux_loss_coef(model),
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }
    if arch == "mixtral":
        specific: dict[str, Any] = {"router_jitter_noise": 0.0}
    else:
        specific = {
            "norm_topk_prob": bool(getattr(moe.router, "renormalize", True)),
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(model.dense_layers)),
            "attention_bias": False,
            "use_sliding_window": False,
            "max_window_layers": model.n_layers,
        }
    if arch == "qwen3_moe_lpr":
        specific |= lpr_config_fields(model)
    return {**common, **specific, "moe_dist": provenance}
