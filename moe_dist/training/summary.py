"""What a run reports: `TrainResult` (returned on every rank), the per-layer load record of
metrics.jsonl, and summary.json.

Shape legend: E experts (global).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_dist.parallel.groups import ParallelGroups


@dataclass
class TrainResult:
    """What a run did; identical on every rank (losses are group means)."""

    run_dir: Path
    start_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean task loss over ranks
    val_losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    counts_per_layer: list[list[float]] = field(default_factory=list)  # whole-run global counts

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[max(self.val_losses)] if self.val_losses else None


def layer_record(block_index: int, counts_E: torch.Tensor, dropped: float) -> dict[str, Any]:
    """One MoE layer's entry in a metrics.jsonl record: its global counts and load summary."""
    from moe_dist.metrics import load_summary  # noqa: PLC0415 - metrics is optional at import time

    return {"layer": block_index, "counts": counts_E.tolist(), **load_summary(counts_E, dropped)}


def end_summary(
    run_dir: Path,
    step: int,
    result: TrainResult,
    groups: ParallelGroups,
    moe_blocks: list[int],
    write: bool,
    engine: dict[str, Any],
    checkpoints: Path,
) -> dict[str, Any]:
    """summary.json's content (written when ``write``): ``engine`` fields go before the layers."""
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": step,
        "final_loss": result.losses.get(step),
        "val_loss": result.final_val_loss,
        "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds,
        "world_size": groups.world_size,
        "ep_size": groups.ep_size,
        **engine,
        "layers": [{"layer": b, "counts": c} for b, c in zip(moe_blocks, result.counts_per_layer)],
        "checkpoints": str(checkpoints),
        "metrics_log": str(run_dir / "metrics.jsonl"),
    }
    if write:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
