"""Expert-load telemetry: one Prometheus exporter per rank (see `Telemetry`, `start_telemetry`).

Importing this package is free: prometheus_client is imported only when telemetry is enabled.
"""

from moe_dist.telemetry.handle import Telemetry
from moe_dist.telemetry.start import start_telemetry

__all__ = ["Telemetry", "start_telemetry"]
