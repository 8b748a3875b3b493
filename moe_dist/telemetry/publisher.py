"""The exporter thread: turns host snapshots into metric values, off the training thread.

Roles decide what a rank publishes (bounded cardinality, see ``metrics_registry``):

1. every rank: its scalars (step, tokens, time split, received-tokens ratio, heartbeat);
2. expert-DP rank 0 of each EP shard: ``moe_expert_tokens_total`` for the experts it hosts,
   from the group-summed received counts, so each expert is exported exactly once;
3. global rank 0: per-layer load statistics, drops, aux losses, router bias spread, losses.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch

from moe_dist.metrics import load_stats_L
from moe_dist.telemetry.accumulator import HostSnapshot
from moe_dist.telemetry.metrics_registry import MetricSet

log = logging.getLogger("moe_dist.telemetry")


@dataclass
class Roles:
    rank: int
    world_size: int
    ep_rank: int
    ep_size: int
    dp_rank: int
    num_local_experts: int

    @property
    def exports_experts(self) -> bool:
        return self.dp_rank == 0

    @property
    def exports_layers(self) -> bool:
        return self.rank == 0


class Publisher:
    def __init__(self, metrics: MetricSet, roles: Roles) -> None:
        self.m = metrics
        self.roles = roles
        self._expert_children: list[list] = []
        # Received tokens since the start (this rank's, the group's): the straggler ratio is taken
        # over these because ranks throttle publishing by their own clocks, so their last
        # intervals differ; cumulative totals agree across ranks whenever all have published.
        self._received_local = 0.0
        self._received_group = 0.0
        self.queue: queue.Queue[HostSnapshot | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="moe-telemetry-publish", daemon=True)
        self.thread.start()

    def submit(self, snap: HostSnapshot) -> None:
        self.queue.put(snap)

    def wait_idle(self) -> None:
        """Block until every submitted snapshot is published."""
        self.queue.join()

    def close(self, timeout_s: float = 10.0) -> None:
        """Publish everything submitted so far, then stop the thread."""
        self.queue.put(None)
        self.thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while (snap := self.queue.get()) is not None:
            try:
                snap.wait()
                t0 = time.thread_time()  # CPU time: what this thread takes from the trainer
                self.publish(snap)
                self.m.rank.publish_seconds.inc(time.thread_time() - t0)
            except Exception:  # noqa: BLE001 - a monitoring bug must not take training down
                log.exception("telemetry: publishing step %d failed", snap.last_step)
            finally:
                if snap.release is not None:
                    snap.release.release()
                self.queue.task_done()

    def publish(self, snap: HostSnapshot) -> None:
        v = snap.views()
        if self.roles.exports_experts:
            self._publish_experts(snap, v)
        if self.roles.exports_layers:
            self._publish_layers(snap, v)
        self._publish_rank(snap, v)  # last: its step and heartbeat say the rest is up to date

    def _publish_rank(self, snap: HostSnapshot, v: dict[str, torch.Tensor]) -> None:
        r = self.m.rank
        r.step.set(snap.last_step)
        r.steps.inc(snap.steps)
        r.tokens.inc(snap.tokens)
        r.step_seconds_total.inc(snap.step_seconds)
        r.all_to_all_seconds.inc(snap.a2a_seconds)
        r.expert_seconds.inc(snap.expert_seconds)
        if snap.step_seconds > 0:
            r.tokens_per_second.set(snap.tokens / snap.step_seconds)
            r.step_seconds.set(snap.step_seconds / snap.steps)
        # Mean tokens per rank = all tokens the group's experts received / world size.
        self._received_local += float(v["local_received_L"].sum())
        self._received_group += float(v["received_LE"].sum())
        if self._received_group > 0:
            r.received_ratio.set(self._received_local * self.roles.world_size / self._received_group)
        if self.roles.exports_layers:
            for term, value in snap.losses.items():
                if math.isfinite(value):
                    r.loss.labels(term).set(value)
        r.last_step_timestamp.set(snap.timestamp)  # last: a scrape never sees a heartbeat without data

    def _publish_experts(self, snap: HostSnapshot, v: dict[str, torch.Tensor]) -> None:
        e = self.roles.num_local_experts
        first = self.roles.ep_rank * e
        received = v["received_LE"][:, first : first + e].tolist()
        if not self._expert_children:  # label lookups once, not every interval
            tokens = self.m.expert.tokens
            self._expert_children = [
                [tokens.labels(str(i), str(x)) for x in range(first, first + e)] for i in range(snap.L)
            ]
        for children, values in zip(self._expert_children, received):
            for child, value in zip(children, values):
                child.inc(value)

    def _publish_layers(self, snap: HostSnapshot, v: dict[str, torch.Tensor]) -> None:
        lm = self.m.layer
        counts_LE = v["counts_LE"]
        stats_L = load_stats_L(counts_LE)
        stats_L["max_mean_ratio"] = stats_L["max_violation"] + 1.0
        stats = {key: values_L.tolist() for key, values_L in stats_L.items()}
        routed, dropped = counts_LE.sum(1).tolist(), v["dropped_L"].tolist()
        aux, spread = v["aux_LA"].tolist(), v["bias_spread_L"].tolist()
        gauges = [
            (lm.gini, "gini"),
            (lm.min_max, "min_max_ratio"),
            (lm.max_mean, "max_mean_ratio"),
            (lm.cv, "cv"),
            (lm.entropy, "normalized_entropy"),
            (lm.max_violation, "max_violation"),
            (lm.dead_experts, "dead_experts"),
        ]
        for layer in range(snap.L):
            name = str(layer)
            lm.routed.labels(name).inc(routed[layer])
            lm.dropped.labels(name).inc(dropped[layer])
            if routed[layer] > 0:  # an interval without tokens says nothing about balance
                for gauge, key in gauges:
                    gauge.labels(name).set(stats[key][layer])
            for j, term in enumerate(snap.aux_names):
                if not math.isnan(aux[layer][j]):
                    lm.aux_loss.labels(name, term).set(aux[layer][j])
            if not math.isnan(spread[layer]):
                lm.bias_spread.labels(name).set(spread[layer])
