"""Generate the Grafana dashboard for moe_dist's expert-load telemetry.

    python tools/make_dashboard.py            # rewrites docker/grafana/dashboards/moe_expert_load.json
    python tools/make_dashboard.py --check    # exit 1 if the committed JSON is stale

Plain dicts in the shape of Grafana's dashboard JSON (schemaVersion 41, Grafana 11.x), type-checked
against npm ``@grafana/schema`` by tests/telemetry/test_telemetry_dashboard.py, and every query run against a
real Prometheus fed by a real training run by tests/telemetry/test_telemetry_live.py.

Variables: ``$datasource`` (Prometheus), ``$job`` (``job_id`` label), ``$layer`` (multi, All).
The per-layer heatmap repeats once per selected layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "docker" / "grafana" / "dashboards" / "moe_expert_load.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job_id="$job"'


class Layout:
    """Hands out ids and grid positions left to right, top to bottom (24 columns)."""

    def __init__(self) -> None:
        self.next_id, self.x, self.y, self.row_h = 1, 0, 0, 0

    def place(self, w: int, h: int) -> dict[str, Any]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> dict[str, Any]:
        self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {
            "type": "row",
            "title": title,
            "id": self.new_id(),
            "collapsed": False,
            "panels": [],
            "gridPos": self.place(24, 1),
        }
        self.x, self.y, self.row_h = 0, self.y + 1, 0
        return panel


def target(expr: str, legend: str = "__auto", ref: str = "A", fmt: str = "time_series") -> dict[str, Any]:
    return {
        "refId": ref,
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "format": fmt,
        "range": True,
    }


def timeseries(
    lay: Layout, title: str, targets: list[dict], unit: str, desc: str, w: int = 12, h: int = 8, **custom: Any
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "id": lay.new_id(),
        "datasource": DS,
        "gridPos": lay.place(w, h),
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 0, **custom}},
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    lay: Layout,
    title: str,
    expr: str,
    unit: str,
    desc: str,
    thresholds: list[tuple[float | None, str]],
    w: int = 4,
) -> dict[str, Any]:
    steps = [{"value": v, "color": c} for v, c in thresholds]
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "id": lay.new_id(),
        "datasource": DS,
        "gridPos": lay.place(w, 4),
        "targets": [target(expr, legend=title)],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
            "showPercentChange": False,
            "percentChangeColorMode": "standard",
            "wideLayout": True,
        },
    }


def heatmap(lay: Layout) -> dict[str, Any]:
    share = (
        f'sum by (expert) (rate(moe_expert_tokens_total{{{JOB}, layer="$layer"}}[$__rate_interval]))'
        f" / ignoring (expert) group_left "
        f'sum(rate(moe_expert_tokens_total{{{JOB}, layer="$layer"}}[$__rate_interval]))'
    )
    return {
        "type": "heatmap",
        "title": "Expert load share, layer $layer",
        "id": lay.new_id(),
        "datasource": DS,
        "description": "Fraction of the layer's tokens each expert received (rows: global expert id). "
        "Balanced = 1/E everywhere; a dark row is a dead expert, a bright one a hot expert.",
        "gridPos": lay.place(12, 9),
        "repeat": "layer",
        "repeatDirection": "h",
        "maxPerRow": 2,
        "targets": [target(share, legend="{{expert}}", fmt="heatmap")],
        "fieldConfig": {"defaults": {"unit": "percentunit"}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {
                "mode": "scheme",
                "scheme": "Viridis",
                "fill": "dark-orange",
                "scale": "exponential",
                "exponent": 0.5,
                "steps": 64,
                "reverse": False,
            },
            "yAxis": {"axisPlacement": "left", "unit": "none"},
            "rowsFrame": {"layout": "auto"},
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": False},
            "cellValues": {"unit": "percentunit"},
            "showValue": "auto",
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
    }


def variables() -> list[dict[str, Any]]:
    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Prometheus",
            "query": "prometheus",
            "current": {"text": "Prometheus", "value": "moe-prometheus"},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        },
        {
            "type": "query",
            "name": "job",
            "label": "Job",
            "datasource": DS,
            "query": {"query": "label_values(moe_job_info, job_id)", "refId": "job"},
            "refresh": 2,
            "sort": 1,
            "includeAll": False,
            "multi": False,
            "hide": 0,
            "regex": "",
            "options": [],
        },
        {
            "type": "query",
            "name": "layer",
            "label": "Layer",
            "datasource": DS,
            "query": {"query": f"label_values(moe_layer_load_gini{{{JOB}}}, layer)", "refId": "layer"},
            "refresh": 2,
            "sort": 3,
            "includeAll": True,
            "multi": True,
            "current": {"text": ["All"], "value": ["$__all"]},
            "hide": 0,
            "regex": "",
            "options": [],
        },
    ]


def panels() -> list[dict[str, Any]]:
    lay = Layout()
    L = 'layer=~"$layer"'
    out: list[dict[str, Any]] = [lay.row("Job")]
    out += [
        stat(
            lay,
            "Tokens/s",
            f"sum(rate(moe_train_tokens_total{{{JOB}}}[$__rate_interval]))",
            "short",
            "Whole-job training throughput.",
            [(None, "blue")],
        ),
        stat(
            lay,
            "Step",
            f"max(moe_train_step{{{JOB}}})",
            "none",
            "Last finished optimizer step.",
            [(None, "blue")],
        ),
        stat(
            lay,
            "Since last step",
            f"time() - min(moe_last_step_timestamp_seconds{{{JOB}}})",
            "s",
            "Seconds since the slowest rank finished a step; grows when the job stalls.",
            [(None, "green"), (60, "orange"), (120, "red")],
        ),
        stat(
            lay,
            "Ranks up",
            f"sum(up{{{JOB}}})",
            "none",
            "Exporters Prometheus can scrape.",
            [(None, "red"), (1, "green")],
        ),
        stat(
            lay,
            "Dead experts",
            f"sum(moe_layer_dead_experts{{{JOB}}})",
            "none",
            "Experts with no token in the last telemetry interval, all layers.",
            [(None, "green"), (1, "red")],
        ),
        stat(
            lay,
            "Worst max/mean",
            f"max(moe_layer_load_max_mean_ratio{{{JOB}}})",
            "none",
            "Busiest expert / mean, worst layer (1 = balanced).",
            [(None, "green"), (1.5, "orange"), (2, "red")],
        ),
    ]
    out.append(lay.row("Expert load"))
    out.append(heatmap(lay))
    out.append(lay.row("Imbalance per layer"))
    per_layer = [
        (
            "Max / mean expert load",
            "moe_layer_load_max_mean_ratio",
            "none",
            "Busiest expert's tokens / mean tokens per expert (1 = balanced).",
        ),
        ("Gini coefficient", "moe_layer_load_gini", "none", "0 = balanced, (E-1)/E = one expert takes all."),
        ("Min / max expert load", "moe_layer_load_min_max_ratio", "none", "1 = balanced, 0 = a dead expert."),
        ("Normalized load entropy", "moe_layer_load_entropy_ratio", "percentunit", "1 = uniform load."),
        ("Coefficient of variation", "moe_layer_load_cv_ratio", "none", "std / mean of expert load."),
        ("Dead experts", "moe_layer_dead_experts", "none", "Experts with no token in the interval."),
    ]
    for title, metric, unit, desc in per_layer:
        out.append(
            timeseries(lay, title, [target(f"{metric}{{{JOB}, {L}}}", "layer {{layer}}")], unit, desc, w=8)
        )
    spread = f"moe_layer_load_max_mean_ratio{{{JOB}}}"
    out.append(
        timeseries(
            lay,
            "Max / mean across layers",
            [
                target(f"quantile(0.5, {spread})", "p50", "A"),
                target(f"quantile(0.9, {spread})", "p90", "B"),
                target(f"max({spread})", "worst layer", "C"),
            ],
            "none",
            "Per-layer imbalance over all layers: how many layers suffer, not just the worst.",
            w=8,
        )
    )
    out.append(
        timeseries(
            lay,
            "Dropped tokens / s",
            [
                target(
                    f"sum by (layer) (rate(moe_layer_dropped_tokens_total{{{JOB}, {L}}}[$__rate_interval]))",
                    "layer {{layer}}",
                )
            ],
            "short",
            "Token slots dropped by expert capacity (0 when dropless).",
            w=8,
        )
    )
    out.append(
        timeseries(
            lay,
            "Aux-free router bias spread",
            [target(f"moe_router_bias_spread{{{JOB}, {L}}}", "layer {{layer}}")],
            "none",
            "max - min of the per-expert routing bias (auxiliary-loss-free balancing).",
            w=8,
        )
    )
    out.append(
        timeseries(
            lay,
            "Auxiliary losses",
            [target(f"moe_layer_aux_loss{{{JOB}, {L}}}", "{{term}} layer {{layer}}")],
            "none",
            "Each balancing / router loss term, coefficient-weighted, last step.",
            w=8,
        )
    )
    out.append(lay.row("Ranks"))
    rank = "rank {{rank}}"
    out += [
        timeseries(
            lay,
            "Step time",
            [target(f"moe_train_step_duration_seconds{{{JOB}}}", rank)],
            "s",
            "Mean optimizer-step time over the last telemetry interval, per rank.",
            w=8,
        ),
        timeseries(
            lay,
            "All-to-all time share",
            [target(f"rate(moe_all_to_all_seconds_total{{{JOB}}}[$__rate_interval])", rank)],
            "percentunit",
            "Fraction of wall time in expert all-to-all (including waiting for peers).",
            w=8,
        ),
        timeseries(
            lay,
            "Expert compute time share",
            [target(f"rate(moe_expert_compute_seconds_total{{{JOB}}}[$__rate_interval])", rank)],
            "percentunit",
            "Fraction of wall time in this rank's expert MLPs.",
            w=8,
        ),
        timeseries(
            lay,
            "Tokens/s per rank",
            [target(f"moe_train_tokens_per_second{{{JOB}}}", rank)],
            "short",
            "Throughput of each rank over the last telemetry interval.",
            w=8,
        ),
        timeseries(
            lay,
            "Tokens received vs mean",
            [target(f"moe_rank_received_tokens_ratio{{{JOB}}}", rank)],
            "none",
            "Tokens each rank's experts received / mean per rank: > 1 is a straggler candidate.",
            w=8,
        ),
        timeseries(
            lay,
            "Training loss",
            [target(f"moe_train_loss{{{JOB}}}", "{{term}}")],
            "none",
            "Loss terms of the last step (rank 0).",
            w=8,
        ),
    ]
    return out


def dashboard() -> dict[str, Any]:
    return {
        "uid": "moe-expert-load",
        "title": "MoE expert load",
        "description": "Expert load, imbalance, dead experts and stragglers of moe_dist training jobs.",
        "tags": ["moe", "moe_dist"],
        "schemaVersion": 41,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "utc",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": variables()},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON differs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python tools/make_dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
