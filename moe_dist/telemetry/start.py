"""`start_telemetry`: the live exporter when ``telemetry.enabled``, else the free no-op `Telemetry`."""

from __future__ import annotations

from typing import Any

from moe_dist.telemetry.handle import Telemetry


def start_telemetry(
    cfg: Any,
    groups: Any,
    *,
    job_id: str,
    model_name: str,
    router_name: str,
    local_rank: int = 0,
    node: str = "localhost",
) -> Telemetry:
    """A live exporter when ``cfg.enabled``, else the no-op. Every rank must call it (it gathers
    endpoints for service discovery)."""
    if not cfg.enabled:
        return Telemetry()
    from moe_dist.telemetry.exporter import Exporter  # noqa: PLC0415 - prometheus_client only when enabled

    return Exporter(
        cfg,
        groups,
        job_id=job_id,
        model_name=model_name,
        router_name=router_name,
        local_rank=local_rank,
        node=node,
    )
