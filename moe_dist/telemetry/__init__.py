"""Expert-load telemetry: one Prometheus exporter per rank (see `Telemetry`).

Importing this package is free: prometheus_client is imported only when telemetry is enabled.
"""

from moe_dist.telemetry.telemetry import Telemetry

__all__ = ["Telemetry"]
