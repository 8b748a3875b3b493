"""End-of-job summary pushed to a Prometheus Pushgateway (rank 0), best effort.

A finished job has no exporter left to scrape, so its summary (final loss, steps, tokens,
wall time, per-layer final imbalance...) goes to the Pushgateway under the grouping key
``{job="moe_dist", job_id=<id>}``. A gateway that is down or slow costs at most ``timeout_s``
and a warning: the training result is never lost to a monitoring failure.
"""

from __future__ import annotations

import logging
import math
import re
import time

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

log = logging.getLogger("moe_dist.telemetry")


def summary_registry(summary: dict, job_id: str, model: str, router: str) -> CollectorRegistry:
    """``moe_job_summary{field=...}`` for every numeric entry of ``summary``, plus a completion time."""
    reg = CollectorRegistry(auto_describe=True)
    g = Gauge(
        "moe_job_summary", "End-of-job summary value by field.", ["field", "model", "router"], registry=reg
    )
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue  # strings, lists, NaN have no place in a gauge
        g.labels(re.sub(r"[^A-Za-z0-9_]", "_", str(key)), model, router).set(float(value))
    Gauge("moe_job_completion_timestamp_seconds", "Unix time the job finished.", registry=reg).set(
        time.time()
    )
    return reg


def push_summary(gateway: str, summary: dict, job_id: str, model: str, router: str, timeout_s: float) -> bool:
    """Push; returns False (and logs a warning) on any failure instead of raising."""
    try:
        push_to_gateway(
            gateway,
            job="moe_dist",
            grouping_key={"job_id": job_id},
            registry=summary_registry(summary, job_id, model, router),
            timeout=timeout_s,
        )
        return True
    except Exception as exc:  # noqa: BLE001 - network, HTTP and URL errors all mean the same here
        log.warning("telemetry: could not push the job summary to the Pushgateway at %s: %s", gateway, exc)
        return False
