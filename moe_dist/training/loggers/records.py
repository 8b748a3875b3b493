"""One metrics.jsonl record -> logger tags: the single mapping the loggers and export-tb share.

Scalars (a record's field -> tag):

| field | tag |
| --- | --- |
| ``loss``, ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``, ``step_seconds`` | ``train/<field>`` |
| ``aux[name]`` | ``train/aux/<name>`` |
| ``skipped`` | ``train/skipped`` (0 or 1) |
| ``val_loss`` | ``val/loss`` |
| ``peak_memory_bytes[r]`` | ``system/peak_memory_bytes/rank_<r>`` |
| ``mfu`` (CUDA) | ``system/mfu`` |
| ``layers[j][stat]``, the layer at block ``i`` | ``moe/layer_<i>/<stat tag>`` (``LAYER_FIELDS``) |

Per-layer stat tags: ``gini``, ``min_max``, ``cv``, ``entropy``, ``max_violation``, ``dead_experts``,
``dropped_fraction``.

Histograms: ``moe/layer_<i>/tokens_per_expert``, the layer's global token-slot counts as a
distribution over expert ids (bucket ``e`` holds expert ``e``'s count), so TensorBoard's
histogram panel and W&B's show the load shape of every step. All values come from the record
itself (the per-layer statistics are ``moe_dist.metrics`` of the same global counts).
"""

from __future__ import annotations

from typing import Any

# metrics.jsonl field -> tag, for the top-level scalars
TRAIN_FIELDS: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens": "train/tokens",
    "tokens_per_s": "train/tokens_per_s",
    "step_seconds": "train/step_seconds",
    "val_loss": "val/loss",
    "mfu": "system/mfu",
}

# layers[j] field -> the tag's last part
LAYER_FIELDS: dict[str, str] = {
    "gini": "gini",
    "min_max_ratio": "min_max",
    "cv": "cv",
    "normalized_entropy": "entropy",
    "max_violation": "max_violation",
    "dead_experts": "dead_experts",
    "dropped_fraction": "dropped_fraction",
}


def layer_prefix(layer: dict[str, Any]) -> str:
    """``moe/layer_<block index>``: the same layer numbering as metrics.jsonl's ``layer``."""
    return f"moe/layer_{layer['layer']}"


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Every scalar of one metrics.jsonl record, by tag (fields a record lacks are left out)."""
    out: dict[str, float] = {}
    for field, tag in TRAIN_FIELDS.items():
        if field in record and record[field] is not None:
            out[tag] = float(record[field])
    for name, value in record.get("aux", {}).items():
        out[f"train/aux/{name}"] = float(value)
    if "skipped" in record:
        out["train/skipped"] = float(bool(record["skipped"]))
    for rank, value in enumerate(record.get("peak_memory_bytes", [])):
        out[f"system/peak_memory_bytes/rank_{rank}"] = float(value)
    for layer in record.get("layers", []):
        prefix = layer_prefix(layer)
        for field, tag in LAYER_FIELDS.items():
            if field in layer:
                out[f"{prefix}/{tag}"] = float(layer[field])
    return out


def record_histograms(record: dict[str, Any]) -> dict[str, list[float]]:
    """Per MoE layer, token-slots per expert (index = expert id), by tag."""
    return {
        f"{layer_prefix(layer)}/tokens_per_expert": [float(c) for c in layer["counts"]]
        for layer in record.get("layers", [])
        if "counts" in layer
    }
