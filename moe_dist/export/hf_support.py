"""What the Hugging Face targets can express, and the refusal for what they cannot.

Targets (``transformers`` classes whose forward the exported model must reproduce exactly):

- ``mixtral``: ``MixtralForCausalLM`` (``models/mixtral/modeling_mixtral.py``): every layer MoE,
  softmax over all experts then top-k, weights always renormalised over the k
  (``MixtralTopKRouter``), SwiGLU experts, no shared experts, no QK-norm, GQA, RoPE (half-split
  ``rotate_half`` layout, as ours), RMSNorm, tied or untied output matrix.
- ``qwen3_moe``: ``Qwen3MoeForCausalLM`` (``models/qwen3_moe/modeling_qwen3_moe.py``): as Mixtral,
  plus QK-norm on every layer (always on: ``Qwen3MoeAttention`` has no switch, so a model
  without ``model.qk_norm`` cannot be expressed), ``norm_topk_prob`` (renormalise or not) and
  dense SwiGLU layers listed in ``mlp_only_layers`` (our ``model.dense_layers`` prefix).
- ``qwen3_moe_lpr``: ``Qwen3MoeLPRForCausalLM``, Hugging Face remote code shipped with the export
  (``hf_lpr``): Qwen3-MoE whose router is LPR's; for ``lpr`` routers only, same rules otherwise.

``choose_arch``: ``--arch`` when given, else ``qwen3_moe_lpr`` for LPR routers, ``qwen3_moe``
for QK-norm models and ``mixtral`` otherwise. ``export_problems`` lists everything the chosen
target cannot express; ``check_exportable`` raises ``ExportError`` with all of them in one line.

Differences that do not change the inference forward (not refused): the router's training-time
input jitter (``jitter_eps``; exported as ``router_jitter_noise`` 0, because Mixtral's jitter
scales the experts' input too, ours only the router's), the balancing losses (training only:
their coefficient becomes ``router_aux_loss_coef`` as metadata, see ``hf_config``), activation
checkpointing, and document masking (a training-time attention mask; ``transformers`` attends
causally over the whole input).
"""

from __future__ import annotations

from typing import Literal

from moe_dist.config import ModelConfig

Arch = Literal["mixtral", "qwen3_moe", "qwen3_moe_lpr"]
ARCHS: tuple[Arch, ...] = ("mixtral", "qwen3_moe", "qwen3_moe_lpr")


class ExportError(Exception):
    """The run cannot be exported as asked (one line: what, and why); the CLI exits 2."""


def choose_arch(model: ModelConfig, arch: str | None) -> Arch:
    """``arch`` when given; else ``qwen3_moe_lpr`` for LPR routers, otherwise the target the
    model's attention says (QK-norm: Qwen3-MoE)."""
    if arch is None:
        if model.moe.router.name == "lpr":
            return "qwen3_moe_lpr"
        return "qwen3_moe" if model.qk_norm else "mixtral"
    if arch not in ARCHS:
        raise ExportError(f"--arch: must be one of {', '.join(ARCHS)}, got {arch!r}")
    return arch  # type: ignore[return-value]


def export_problems(model: ModelConfig, arch: Arch) -> list[str]:
    """Every part of ``model`` that ``arch`` cannot express, as ``config path: why`` strings."""
    problems: list[str] = []
    moe = model.moe
    router = moe.router
    if arch == "qwen3_moe_lpr":
        if router.name != "lpr":
            problems.append(
                f"model.moe.router.name: {router.name}; qwen3_moe_lpr is the remote code of the lpr "
                "router (use --arch qwen3_moe or mixtral)"
            )
    elif router.name != "topk_softmax":
        why = {
            "topk_sigmoid_bias": "sigmoid scores with a per-expert selection bias (DeepSeek-V3)",
            "expert_choice": "experts choose their tokens, so a token has a variable number of experts",
            "lpr": "LPR's latent encoder and cosine prototype scores (use --arch qwen3_moe_lpr: remote code)",
        }.get(router.name, "a router other than softmax top-k")
        problems.append(
            f"model.moe.router.name: {router.name} ({why}) has no counterpart in {arch}'s router, "
            "which is softmax over the experts then top-k"
        )
    elif arch == "mixtral" and not getattr(router, "renormalize", True):
        problems.append(
            "model.moe.router.renormalize: false, but Mixtral always renormalises the top-k weights "
            "(use --arch qwen3_moe: norm_topk_prob false)"
        )
    if router.name == "topk_softmax" and getattr(router, "bias_update_rate", 0) > 0:
        problems.append(
            f"model.moe.router.bias_update_rate: {router.bias_update_rate}; the loss-free expert bias "
            f"changes which experts are chosen, and {arch}'s router has no bias"
        )
    if moe.capacity_factor is not None:
        problems.append(
            f"model.moe.capacity_factor: {moe.capacity_factor} drops token-slots over capacity; "
            f"{arch} is dropless"
        )
    if moe.shared_experts.count > 0:
        problems.append(
            f"model.moe.shared_experts.count: {moe.shared_experts.count}; {arch} has no shared experts"
        )
    if moe.experts.activation != "swiglu":
        problems.append(
            f"model.moe.experts.activation: {moe.experts.activation}; {arch}'s experts are SwiGLU (silu gate)"
        )
    if model.dense_layers > 0 and arch == "mixtral":
        problems.append(
            f"model.dense_layers: {model.dense_layers}; Mixtral has no dense layers "
            "(use --arch qwen3_moe: mlp_only_layers)"
        )
    if model.qk_norm and arch == "mixtral":
        problems.append("model.qk_norm: true; Mixtral's attention has no QK-norm (use --arch qwen3_moe)")
    if not model.qk_norm and arch in ("qwen3_moe", "qwen3_moe_lpr"):
        hint = "(use --arch mixtral)" if arch == "qwen3_moe" else "(the LPR export is Qwen3-MoE only)"
        problems.append(f"model.qk_norm: false; Qwen3-MoE always normalises q and k per head {hint}")
    return problems


def check_exportable(model: ModelConfig, arch: Arch) -> None:
    """``ExportError`` naming every problem ``export_problems`` finds, in one line."""
    problems = export_problems(model, arch)
    if problems:
        raise ExportError(f"cannot export as {arch}: " + "; ".join(problems))
