"""`Telemetry`: the trainer's one handle on monitoring, and its no-op form. Disabled, it is free.

The trainer's whole contract (``start_telemetry`` is in ``start.py``)::

    tel = start_telemetry(cfg.telemetry, groups, job_id=..., model_name=..., router_name=...,
                          local_rank=..., node=...)
    tel.wants_timing          # should layers time their all-to-all and experts?
    tel.on_step(step, model.moe_layers(), global_counts, tokens=...)   # every step, device work only
    tel.set_losses({...})     # the loss terms, when the loop has read them back (log steps)
    tel.close(summary)

With ``enabled: false`` this class is the whole implementation: no prometheus_client import, no
thread, no socket, and ``on_step`` returns at once. Enabled, ``start_telemetry`` returns the
live `moe_dist.telemetry.exporter.Exporter`, a subclass (imported only then).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_dist.layers.gate import HasGate
    from moe_dist.training.step_hook import StepCounts


class Telemetry:
    wants_timing: bool | None = False

    def on_step(
        self,
        step: int,
        layers: Sequence[HasGate],
        global_counts: StepCounts,
        *,
        step_seconds: float | None = None,
        tokens: int = 0,
        losses: dict[str, float] | None = None,
    ) -> None:
        pass

    def set_losses(self, losses: dict[str, float]) -> None:
        pass

    def close(self, summary: dict | None = None) -> None:
        pass

    def serving(self) -> str | None:
        """Where every rank serves its metrics (one console line), or None when disabled."""
        return None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close({})
