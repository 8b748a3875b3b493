"""Weights & Biases logger (rank 0): ``wandb.init`` once, ``run.log(..., step=step)`` per step.

Imported only when ``logging.wandb.enabled``. ``mode: offline`` writes the run under
``DIR/wandb/offline-run-*`` with no network (upload later with ``wandb sync DIR/wandb/offline-run-*``);
``online`` streams to the W&B server the user is logged in to. The run's config is the resolved
moe_dist config. Tags are those of ``records.py``; each MoE layer's tokens-per-expert histogram
is a ``wandb.Histogram`` with one bin per expert id. ``console="off"``: W&B leaves the trainer's
stdout and stderr alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb


class WandbLogger:
    """One W&B run."""

    name = "wandb"

    def __init__(
        self, directory: Path, mode: str, project: str, run_name: str, config: dict[str, Any]
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, init_timeout=60.0)
        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(directory),
            mode=mode,
            config=config,
            settings=settings,
            reinit="create_new",
        )
        self.dir = Path(self.run.dir).parent  # the run's folder: offline-run-* or run-*

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        data: dict[str, Any] = dict(scalars)
        for tag, counts in histograms.items():
            edges = [e - 0.5 for e in range(len(counts) + 1)]
            data[tag] = wandb.Histogram(np_histogram=(counts, edges))
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()
