"""Named router/loss variants: each is a replacement for ``model.moe.router`` and ``model.moe.losses``.

A variant changes nothing else: same model, data, seed, learning rate, schedule and steps, so
the comparison isolates the router and the balancing loss. ``top_k`` is taken from the base
config's router, so every variant routes each token to the same number of experts (expert choice
gets ``capacity_factor = top_k``: the same number of expert slots per token on average).

Coefficients are the papers' defaults (docs/results.md says where each comes from); none is tuned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Variant:
    """``overrides`` (``KEY=VALUE`` as ``--set``) and ``seeds`` come from a preset's arm
    (``presets.ArmSpec``): what else the arm changes (e.g. ``schedule.steps``) and the seeds it
    runs with (None: every seed of the comparison)."""

    name: str
    description: str
    router: dict[str, Any]
    losses: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | None = None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("none", "softmax top-k, no balancing loss", {"name": "topk_softmax"}),
        Variant(
            "switch",
            "softmax top-k + Switch/GShard loss 0.01 (the baseline)",
            {"name": "topk_softmax"},
            [{"name": "switch", "coef": 0.01}],
        ),
        Variant(
            "global_batch",
            "softmax top-k + global-batch loss 0.01 (Qiu et al.; equals switch on one process)",
            {"name": "topk_softmax"},
            [{"name": "global_batch", "coef": 0.01}],
        ),
        Variant(
            "seq_aux",
            "softmax top-k + DeepSeek sequence-wise loss 0.01",
            {"name": "topk_softmax"},
            [{"name": "seq_aux", "coef": 0.01}],
        ),
        Variant(
            "aux_free",
            "sigmoid top-k + loss-free bias, rate 0.001 (DeepSeek-V3)",
            {"name": "topk_sigmoid_bias", "bias_update_rate": 0.001},
        ),
        Variant(
            "aux_free_seq",
            "aux_free + sequence-wise loss 1e-4 (DeepSeek-V3's full recipe)",
            {"name": "topk_sigmoid_bias", "bias_update_rate": 0.001},
            [{"name": "seq_aux", "coef": 1e-4}],
        ),
        Variant(
            "simbal",
            "softmax top-k, orthogonal init + SimBal 0.1 + z-loss 1e-5 (Omi et al.)",
            {"name": "topk_softmax", "init": "orthogonal"},
            [{"name": "simbal", "coef": 0.1}, {"name": "z_loss", "coef": 1e-5}],
        ),
        Variant("lpr", "latent prototype router, official defaults, no Switch loss (Yang)", {"name": "lpr"}),
        Variant(
            "expert_choice",
            "expert choice, capacity factor = top_k (non-causal: sees the whole micro-batch)",
            {"name": "expert_choice"},
        ),
    ]
}

# The single-process default: global_batch is switch's twin at world size 1 (it differs only
# when several ranks see different micro-batches), expert_choice's routing looks at later tokens.
DEFAULT_VARIANTS = ["switch", "none", "seq_aux", "aux_free", "simbal", "lpr"]
BASELINE = "switch"


class UnknownVariantError(ValueError):
    pass


def parse_variants(text: str, known: dict[str, Variant] | None = None) -> list[str]:
    """``"switch,lpr"`` -> names, checked against ``known`` (default: the built-in variants); one
    message naming every unknown or repeated name."""
    known = VARIANTS if known is None else known
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownVariantError(
            f"--variants: unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UnknownVariantError(f"--variants: {', '.join(repeated)} given more than once")
    if not names:
        raise UnknownVariantError("--variants: no variant named")
    return names


def apply_variant(base: dict[str, Any], variant: Variant | str) -> dict[str, Any]:
    """A deep copy of the raw config ``base`` with the router and losses of ``variant`` (a name
    of the built-in ``VARIANTS`` or a preset's arm); a router that names its own ``top_k`` (or
    capacity factor) keeps it."""
    if isinstance(variant, str):
        variant = VARIANTS[variant]
    data = copy.deepcopy(base)
    moe = data.setdefault("model", {}).setdefault("moe", {})
    base_router = moe.get("router") or {}
    top_k = int(base_router.get("top_k", 2))
    router = copy.deepcopy(variant.router)
    if router["name"] == "expert_choice":
        router.setdefault("capacity_factor", float(top_k))
    else:
        router.setdefault("top_k", top_k)
    moe["router"] = router
    moe["losses"] = copy.deepcopy(variant.losses)
    return data
