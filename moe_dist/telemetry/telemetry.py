"""`Telemetry`: the trainer's one handle on monitoring. Disabled, it is free.

The trainer's whole contract::

    tel = Telemetry.start(cfg.telemetry, groups, job_id=..., model_name=..., router_name=...,
                          local_rank=..., node=...)
    tel.wants_timing          # should layers time their all-to-all and experts?
    tel.on_step(step, model.moe_layers(), global_counts, step_seconds=..., tokens=..., losses={...})
    tel.close(summary)

With ``enabled: false`` this class is the whole implementation: no prometheus_client import, no
thread, no socket, and ``on_step`` returns at once. Enabled, ``start`` returns the live
`moe_dist.telemetry.exporter.Exporter` (imported only then).
"""

from __future__ import annotations

from typing import Any


class Telemetry:
    wants_timing: bool = False

    @classmethod
    def start(
        cls,
        cfg: Any,
        groups: Any,
        *,
        job_id: str,
        model_name: str,
        router_name: str,
        local_rank: int = 0,
        node: str = "localhost",
    ) -> Telemetry:
        """A live exporter when ``cfg.enabled``, else this no-op. Every rank must call it (it gathers
        endpoints for service discovery)."""
        if not cfg.enabled:
            return cls()
        from moe_dist.telemetry.exporter import Exporter

        return Exporter(
            cfg,
            groups,
            job_id=job_id,
            model_name=model_name,
            router_name=router_name,
            local_rank=local_rank,
            node=node,
        )

    def on_step(
        self,
        step: int,
        layers: list,
        global_counts: list,
        *,
        step_seconds: float = 0.0,
        tokens: int = 0,
        losses: dict[str, float] | None = None,
    ) -> None:
        pass

    def close(self, summary: dict | None = None) -> None:
        pass

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close({})
