"""Every metric a rank exports: names, help texts, labels, on one `CollectorRegistry` per rank.

Cardinality is bounded by construction (L layers, E experts, R ranks, A aux-loss terms):

    per expert   L x E series in the whole cluster: ``moe_expert_tokens_total{layer,expert}`` is
                 exported only by the rank that hosts the expert in data-parallel replica 0
                 (expert-DP rank 0), with the count summed over all replicas of that expert.
    per layer    L x (10 + A) series, exported by global rank 0 only.
    per rank     R x ~14 scalars (step, throughput, time split, straggler ratio, heartbeat).

Rank, node and job labels are not metric labels: Prometheus attaches them from the ``file_sd``
targets, so a single exporter scraped without service discovery stays valid too.
Names follow the Prometheus conventions: ``moe_`` prefix, base units, ``_total`` on counters,
``_ratio`` on dimensionless fractions, ``_seconds`` on times.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Info


@dataclass
class ExpertMetrics:
    tokens: Counter


@dataclass
class LayerMetrics:
    gini: Gauge
    min_max: Gauge
    max_mean: Gauge
    cv: Gauge
    entropy: Gauge
    max_violation: Gauge
    dead_experts: Gauge
    dropped: Counter
    routed: Counter
    aux_loss: Gauge
    bias_spread: Gauge


@dataclass
class RankMetrics:
    step: Gauge
    steps: Counter
    tokens: Counter
    tokens_per_second: Gauge
    step_seconds: Gauge
    step_seconds_total: Counter
    all_to_all_seconds: Counter
    expert_seconds: Counter
    received_ratio: Gauge
    last_step_timestamp: Gauge
    loss: Gauge
    snapshots_skipped: Counter
    publish_seconds: Counter
    job: Info


@dataclass
class MetricSet:
    registry: CollectorRegistry
    expert: ExpertMetrics
    layer: LayerMetrics
    rank: RankMetrics


def build_metrics() -> MetricSet:
    """A fresh registry (never the process-global one) holding every family this rank may export."""
    reg = CollectorRegistry(auto_describe=True)
    expert = ExpertMetrics(
        tokens=Counter(
            "moe_expert_tokens",
            "Tokens the expert received (after all-to-all and capacity drops), summed over its "
            "data-parallel replicas; exported once per expert (global id) by expert-DP rank 0.",
            ["layer", "expert"],
            registry=reg,
        ),
    )
    layer = LayerMetrics(
        gini=Gauge(
            "moe_layer_load_gini",
            "Gini coefficient of expert load over the last interval "
            "(0 = balanced, 1 = one expert takes all).",
            ["layer"],
            registry=reg,
        ),
        min_max=Gauge(
            "moe_layer_load_min_max_ratio",
            "Least-loaded / most-loaded expert tokens.",
            ["layer"],
            registry=reg,
        ),
        max_mean=Gauge(
            "moe_layer_load_max_mean_ratio",
            "Most-loaded expert tokens / mean tokens per expert.",
            ["layer"],
            registry=reg,
        ),
        cv=Gauge(
            "moe_layer_load_cv_ratio",
            "Coefficient of variation (std / mean) of expert load.",
            ["layer"],
            registry=reg,
        ),
        entropy=Gauge(
            "moe_layer_load_entropy_ratio",
            "Entropy of the expert-load distribution / log(E) (1 = uniform).",
            ["layer"],
            registry=reg,
        ),
        max_violation=Gauge(
            "moe_layer_load_max_violation_ratio",
            "MaxVio: (max - mean) / mean expert load.",
            ["layer"],
            registry=reg,
        ),
        dead_experts=Gauge(
            "moe_layer_dead_experts",
            "Experts that received no token in the last interval.",
            ["layer"],
            registry=reg,
        ),
        dropped=Counter(
            "moe_layer_dropped_tokens",
            "Token slots dropped by expert capacity, whole job.",
            ["layer"],
            registry=reg,
        ),
        routed=Counter(
            "moe_layer_routed_tokens",
            "Token slots the router assigned (before drops), whole job.",
            ["layer"],
            registry=reg,
        ),
        aux_loss=Gauge(
            "moe_layer_aux_loss",
            "Auxiliary loss term of the last step, coefficient-weighted.",
            ["layer", "term"],
            registry=reg,
        ),
        bias_spread=Gauge(
            "moe_router_bias_spread",
            "max - min of the router's per-expert bias (auxiliary-loss-free balancing).",
            ["layer"],
            registry=reg,
        ),
    )
    rank = RankMetrics(
        step=Gauge("moe_train_step", "Last optimizer step this rank finished.", registry=reg),
        steps=Counter("moe_train_steps", "Optimizer steps this rank finished.", registry=reg),
        tokens=Counter("moe_train_tokens", "Tokens this rank processed.", registry=reg),
        tokens_per_second=Gauge(
            "moe_train_tokens_per_second", "This rank's throughput over the last interval.", registry=reg
        ),
        step_seconds=Gauge(
            "moe_train_step_duration_seconds", "Mean step time over the last interval.", registry=reg
        ),
        step_seconds_total=Counter("moe_train_step_seconds", "Time spent in training steps.", registry=reg),
        all_to_all_seconds=Counter(
            "moe_all_to_all_seconds",
            "Time spent in expert all-to-all (dispatch and combine), including waiting for peers.",
            registry=reg,
        ),
        expert_seconds=Counter(
            "moe_expert_compute_seconds", "Time spent in this rank's expert MLPs.", registry=reg
        ),
        received_ratio=Gauge(
            "moe_rank_received_tokens_ratio",
            "Tokens this rank's experts received / mean per "
            "rank since the start of the run (straggler signal: > 1 = overloaded).",
            registry=reg,
        ),
        last_step_timestamp=Gauge(
            "moe_last_step_timestamp_seconds", "Unix time of the last finished step.", registry=reg
        ),
        loss=Gauge(
            "moe_train_loss", "Training loss terms of the last step (rank 0).", ["term"], registry=reg
        ),
        snapshots_skipped=Counter(
            "moe_telemetry_snapshots_deferred",
            "Intervals whose statistics were folded into the next one because the exporter thread was busy.",
            registry=reg,
        ),
        publish_seconds=Counter(
            "moe_telemetry_publish_seconds",
            "CPU time the exporter thread spent turning snapshots into metric values.",
            registry=reg,
        ),
        job=Info("moe_job", "The training job this rank belongs to.", registry=reg),
    )
    return MetricSet(reg, expert, layer, rank)
