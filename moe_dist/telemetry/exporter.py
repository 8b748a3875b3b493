"""The live per-rank exporter behind `Telemetry` when ``telemetry.enabled`` is true.

Start (every rank, collectively):

1. Build this rank's metric families on its own registry; set ``moe_job_info``.
2. Serve them on ``bind:port_base + local_rank`` (TLS / basic auth / port fallback per config).
3. Gather every rank's actual endpoint (or its start error, so all ranks fail together with
   every message instead of one rank failing and the others hanging); rank 0 writes ``file_sd``.
4. Start the publisher thread.

Per step (training thread, no host sync): fold the step into the device sum; every
``interval_steps``, but at most every ``min_publish_interval_s`` (Prometheus scrapes every few
seconds: publishing more often only costs CPU), start the asynchronous fetch and hand it to the
publisher.
Close: publish the remainder, push the summary (rank 0), linger, withdraw targets, stop serving.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import prometheus_client

from moe_dist.telemetry.accumulator import StatsAccumulator
from moe_dist.telemetry.file_sd import (
    Endpoint,
    gather_endpoints,
    serving_line,
    target_groups,
    targets_path,
    write_targets,
)
from moe_dist.telemetry.handle import Telemetry
from moe_dist.telemetry.metrics_registry import build_metrics
from moe_dist.telemetry.publisher import Publisher, Roles
from moe_dist.telemetry.push import push_summary
from moe_dist.telemetry.server import MetricsServer, TelemetryError, start_server

if TYPE_CHECKING:
    from moe_dist.layers.gate import HasGate
    from moe_dist.training.step_hook import StepCounts

log = logging.getLogger("moe_dist.telemetry")


class Exporter(Telemetry):
    def __init__(
        self,
        cfg: Any,
        groups: Any,
        *,
        job_id: str,
        model_name: str,
        router_name: str,
        local_rank: int,
        node: str,
    ) -> None:
        self.cfg, self.groups, self.job_id = cfg, groups, job_id
        self.model_name, self.router_name = model_name, router_name
        self.rank = groups.rank
        self.wants_timing = cfg.timing  # None: the trainer decides by device
        self.closed = False
        self._warned = False
        # 1. metrics (``_created`` series would double the per-expert cardinality for nothing)
        prometheus_client.disable_created_metrics()
        self.metrics = build_metrics()
        self.metrics.rank.job.info({"job_id": job_id, "model": model_name, "router": router_name})
        # 2. serve; 3. gather endpoints or errors
        error, self.server = None, None
        try:
            self.server = self._serve(cfg, local_rank)
        except TelemetryError as exc:
            error = "; ".join(exc.errors)
        except OSError as exc:
            error = f"telemetry: cannot serve metrics on {cfg.bind}: {exc}"
        host = cfg.advertise_host or (node if cfg.bind in ("0.0.0.0", "::", "") else cfg.bind)
        mine = Endpoint(
            self.rank,
            local_rank,
            node,
            host,
            self.server.port if self.server else -1,
            self.server.scheme if self.server else f"error: {error}",
        )
        self.endpoints = gather_endpoints(mine)
        if any(e.scheme.startswith("error: ") for e in self.endpoints):
            if self.server is not None:
                self.server.close()
            raise TelemetryError(
                [
                    f"rank {e.rank}: {e.scheme[len('error: ') :]}"
                    for e in self.endpoints
                    if e.scheme.startswith("error: ")
                ]
            )
        self.sd_path: Path | None = None
        if self.rank == 0 and cfg.file_sd_path:
            self.sd_path = targets_path(cfg.file_sd_path, job_id)
            try:
                write_targets(self.sd_path, target_groups(self.endpoints, job_id))
            except OSError as exc:  # monitoring must not stop the job (and rank 0 alone cannot)
                log.warning(
                    "telemetry.file_sd_path: cannot write %s (%s); Prometheus will not discover this job",
                    self.sd_path,
                    exc,
                )
                self.sd_path = None
        # A short job can end before Prometheus first looks; let it see the start.
        if cfg.wait_for_scrape_s > 0 and not self.server.scraped.wait(cfg.wait_for_scrape_s):
            log.warning(
                "telemetry: rank %d was not scraped within %.0f s; training anyway",
                self.rank,
                cfg.wait_for_scrape_s,
            )
        # 4. publisher
        e = getattr(groups, "ep_size", 1)
        self.roles = Roles(
            rank=self.rank,
            world_size=groups.world_size,
            ep_rank=groups.ep_rank,
            ep_size=e,
            dp_rank=groups.dp_rank,
            num_local_experts=0,
        )
        self.publisher: Publisher | None = None
        self.acc = StatsAccumulator(cfg.interval_steps)
        self._last_snapshot = -math.inf
        self._layers: Sequence[HasGate] = []
        self._step = 0
        self._losses: dict[str, float] = {}
        self._last_step_clock = 0.0

    def serving(self) -> str | None:
        """Every rank's real endpoint (gathered at start), one line: ``file_sd.serving_line``."""
        return serving_line(self.endpoints)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"{self.server.scheme}://{self.endpoints[self.rank].host}:{self.server.port}/metrics"

    def _serve(self, cfg: Any, local_rank: int) -> MetricsServer:
        auth = None
        if cfg.basic_auth_user:
            env = cfg.basic_auth_password_env
            if not env or not os.environ.get(env):
                raise TelemetryError(
                    f"telemetry.basic_auth_password_env: set it to an environment variable "
                    f"holding the password for user {cfg.basic_auth_user!r}"
                    + (f" ({env} is empty or unset)" if env else "")
                )
            auth = (cfg.basic_auth_user, os.environ[env])
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            raise TelemetryError("telemetry.tls_cert, telemetry.tls_key: give both or neither")
        port = cfg.port_base + local_rank if cfg.port_base else 0
        return start_server(
            self.metrics.registry,
            cfg.bind,
            port,
            fallback=cfg.port_fallback,
            certfile=cfg.tls_cert,
            keyfile=cfg.tls_key,
            auth=auth,
        )

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
        """Fold one step in (device work only). ``step_seconds`` None: the host time since the
        previous call (the loop does not wait for the device, so over an interval of steps this
        is the device's pace). ``losses``: host values; None keeps the last ones set."""
        now_clock = time.perf_counter()
        if step_seconds is None:
            step_seconds = now_clock - self._last_step_clock if self._last_step_clock else 0.0
        self._last_step_clock = now_clock
        if self.closed or not global_counts.counts_E:
            return
        try:
            self._layers, self._step = layers, step
            if losses is not None:
                self._losses = losses
            if self.publisher is None:
                self.roles.num_local_experts = global_counts.counts_E[0].numel() // max(self.roles.ep_size, 1)
                self.publisher = Publisher(self.metrics, self.roles)
            self.acc.add(global_counts, step_seconds, tokens)
            now = time.monotonic()
            if self.acc.due(step) and now - self._last_snapshot >= self.cfg.min_publish_interval_s:
                self._last_snapshot = now
                snap = self.acc.snapshot(layers, step, losses or {})
                if snap is None:
                    self.metrics.rank.snapshots_skipped.inc()
                else:
                    self.publisher.submit(snap)
        except Exception:  # noqa: BLE001 - monitoring must never fail a training step
            if not self._warned:
                log.exception("telemetry: step %d could not be recorded (training continues)", step)
                self._warned = True

    def set_losses(self, losses: dict[str, float]) -> None:
        """The newest loss values read back by the loop (published with the next snapshot)."""
        self._losses = dict(losses)

    def flush(self) -> None:
        """Publish the steps folded so far now and wait until the endpoint shows them (blocking:
        for evaluation boundaries and tests, not for every step)."""
        if self.publisher is None or self.closed:
            return
        if self.acc.steps:
            snap = self.acc.snapshot(self._layers, self._step, self._losses, force=True)
            if snap is not None:
                self.publisher.submit(snap)
        self.publisher.wait_idle()

    def close(self, summary: dict | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        summary = summary or {}
        if self.publisher is not None:
            if self.acc.steps:
                snap = self.acc.snapshot(self._layers, self._step, self._losses, force=True)
                if snap is not None:
                    self.publisher.submit(snap)
            self.publisher.close()
        if self.rank == 0 and self.cfg.pushgateway:
            push_summary(
                self.cfg.pushgateway,
                summary,
                self.job_id,
                self.model_name,
                self.router_name,
                self.cfg.push_timeout_s,
            )
        if self.cfg.linger_s > 0 and not summary.get("error"):  # a failed job does not linger
            time.sleep(self.cfg.linger_s)
        if self.sd_path is not None:
            with contextlib.suppress(OSError):
                self.sd_path.unlink(missing_ok=True)
        if self.server is not None:
            self.server.close()
