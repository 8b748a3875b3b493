"""What a run reports: `TrainResult` (returned on every rank), the per-layer load record of
metrics.jsonl, and summary.json.

Shape legend: E experts (global).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.step_buffer import StepRecord


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
    stop_reason: str | None = None  # set when a signal or run.max_minutes ended the run early

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[max(self.val_losses)] if self.val_losses else None


def step_record(row: StepRecord, tokens_per_step: int, utilization: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step's line of metrics.jsonl (docs/metrics_log.md) from its read-back values;
    ``utilization``: peak memory and MFU (``Utilization.fields``)."""
    return {
        "step": row.step,
        "loss": row.loss,
        "aux": row.aux,
        "lr": row.lr,
        "grad_norm": row.grad_norm,
        "tokens": row.step * tokens_per_step,
        "tokens_per_s": tokens_per_step / row.step_seconds if row.step_seconds > 0 else 0.0,
        "step_seconds": row.step_seconds,
        "skipped": row.skipped,
        **utilization,
        "layers": row.layers,
    }


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
