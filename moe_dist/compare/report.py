"""The comparison table: every number computed from the runs' metrics logs (and final-model analysis).

Shape legend: L MoE layers, N logged steps, E experts, M evaluations.

Per variant:

- ``final_val_loss``: the last evaluation of the run.
- ``steps_to_baseline`` / ``tokens_to_baseline``: iso-loss, as SimBal's "36% faster": the first
  point where the validation curve reaches the baseline's FINAL validation loss, linearly
  interpolated between the two evaluations around the crossing; None = never reached.
  ``speedup`` = 1 - tokens_to_baseline / baseline's total tokens (SimBal's 1 - 12.7B/19.9B).
- Load balance over the last ``last_n`` steps: each layer's global counts summed over those
  steps, then ``moe_dist.metrics`` Gini, min/max, CV, MaxVio; mean over layers (the LPR paper
  averages its per-layer values). ``ema_gini`` / ``ema_min_max``: LPR's reporting, the 0.99 EMA of
  the per-step counts over the whole run (``metrics.EMALoadTracker``), mean over layers.
- ``drop_fraction`` (capacity factor 1.0) and ``pes_min``: from ``final_model.analyze_final_model``.
- ``tokens_per_s``: median of the per-step throughput (evaluation excluded; runs sharing a
  machine slow each other down, so compare it only between runs made alike).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from moe_dist import metrics
from moe_dist.compare.arm_logs import RunLog

LPR_EMA_DECAY = 0.99


def iso_loss_point(
    steps_M: np.ndarray, tokens_M: np.ndarray, val_loss_M: np.ndarray, target: float
) -> tuple[float, float] | None:
    """(step, tokens) where the validation curve first reaches ``target`` (interpolated), or None."""
    for m in range(len(val_loss_M)):
        if val_loss_M[m] <= target:
            if m == 0:
                return float(steps_M[0]), float(tokens_M[0])
            l0, l1 = float(val_loss_M[m - 1]), float(val_loss_M[m])
            w = (l0 - target) / (l0 - l1)
            step = float(steps_M[m - 1]) + w * float(steps_M[m] - steps_M[m - 1])
            tokens = float(tokens_M[m - 1]) + w * float(tokens_M[m] - tokens_M[m - 1])
            return step, tokens
    return None


def window_load_metrics(counts_LNE: np.ndarray, last_n: int) -> dict[str, Any]:
    """Load metrics of the counts summed over the last ``last_n`` steps, per layer and their mean."""
    window_LE = counts_LNE[:, -last_n:, :].sum(axis=1)
    per_layer = [
        {
            "gini": metrics.gini(c),
            "min_max_ratio": metrics.min_max_ratio(c),
            "cv": metrics.coefficient_of_variation(c),
            "max_violation": metrics.max_violation(c),
        }
        for c in torch.from_numpy(window_LE)
    ]
    out: dict[str, Any] = {k: float(np.mean([d[k] for d in per_layer])) for k in per_layer[0]}
    out["per_layer"] = per_layer
    return out


def ema_load_metrics(counts_LNE: np.ndarray, decay: float = LPR_EMA_DECAY) -> dict[str, Any]:
    """LPR's EMA-of-counts Gini and min/max at the end of the run: mean over layers, and per layer."""
    ginis, ratios = [], []
    for counts_NE in counts_LNE:
        tracker = metrics.EMALoadTracker(counts_NE.shape[-1], decay)
        for c in torch.from_numpy(counts_NE):
            tracker.update(c)
        s = tracker.summary()
        ginis.append(s["gini"])
        ratios.append(s["min_max_ratio"])
    return {
        "ema_gini": float(np.mean(ginis)),
        "ema_min_max": float(np.mean(ratios)),
        "ema_gini_per_layer": [float(g) for g in ginis],
        "ema_min_max_per_layer": [float(r) for r in ratios],
    }


def ema_gini_curve(counts_NE: np.ndarray, decay: float = LPR_EMA_DECAY) -> np.ndarray:
    """LPR's EMA Gini after every step of one layer: ``[N]``."""
    tracker = metrics.EMALoadTracker(counts_NE.shape[-1], decay)
    out = []
    for c in torch.from_numpy(counts_NE):
        tracker.update(c)
        out.append(tracker.summary()["gini"])
    return np.asarray(out)


def per_step_gini(counts_LNE: np.ndarray) -> np.ndarray:
    """Gini of each step's counts, mean over layers: ``[N]`` (for the plot)."""
    return np.array(
        [
            np.mean([metrics.gini(torch.from_numpy(counts_LNE[li, n])) for li in range(counts_LNE.shape[0])])
            for n in range(counts_LNE.shape[1])
        ]
    )


def summarize(
    logs: dict[str, RunLog], final: dict[str, dict[str, Any]], baseline: str, last_n: int
) -> list[dict[str, Any]]:
    """One row per variant (in the order of ``logs``); ``final`` maps variant -> final-model analysis."""
    base = logs.get(baseline)
    target = base.final_val_loss if base is not None else None
    rows = []
    for name, log in logs.items():
        row: dict[str, Any] = {
            "variant": name,
            "steps": int(log.steps_N[-1]),
            "tokens": float(log.tokens_N[-1]),
            "final_val_loss": log.final_val_loss,
            "final_train_loss": float(log.loss_N[-1]),
            "tokens_per_s": float(
                np.nanmedian(log.tokens_per_s_N[1:] if len(log.tokens_per_s_N) > 1 else log.tokens_per_s_N)
            ),
            "last_n": min(last_n, len(log.steps_N)),
        }
        row["baseline_val_loss"] = target
        row["steps_to_baseline"] = row["tokens_to_baseline"] = row["speedup"] = None
        if target is not None and len(log.val_loss_M):
            hit = iso_loss_point(log.eval_steps_M, log.eval_tokens_M, log.val_loss_M, target)
            if hit is not None:
                row["steps_to_baseline"], row["tokens_to_baseline"] = hit
                row["speedup"] = 1.0 - hit[1] / float(base.tokens_N[-1])
        w = window_load_metrics(log.counts_LNE, last_n)
        row.update({k: w[k] for k in ("gini", "min_max_ratio", "cv", "max_violation")})
        row["load_per_layer"] = w["per_layer"]
        row.update(ema_load_metrics(log.counts_LNE))
        f = final.get(name) or {}
        row["drop_fraction"] = f.get("drop_fraction")
        row["pes_min"] = f.get("pes_min")
        row["final_model"] = f
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec)


def _tokens(v: float) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,.0f}"


def markdown_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """The results table (Markdown); the numbers are those of ``rows`` with fixed precision."""
    head = (
        f"| variant | final val loss | Δ vs {baseline} | steps (tokens) to {baseline}'s final val loss | "
        "speedup | Gini | min/max | CV | MaxVio | EMA Gini | EMA min/max | drop @cf1.0 | PES (min layer) "
        "| tok/s |"
    )
    lines = [head, "|" + "---|" * 14]
    base = next((r for r in rows if r["variant"] == baseline), None)
    for r in rows:
        delta = None
        if base is not None and r["final_val_loss"] is not None and base["final_val_loss"] is not None:
            delta = r["final_val_loss"] - base["final_val_loss"]
        if r["steps_to_baseline"] is None:
            reach = "not reached" if base is not None else "n/a"
        else:
            reach = f"{r['steps_to_baseline']:.0f} ({_tokens(r['tokens_to_baseline'])})"
        cells = [
            r["variant"],
            _fmt(r["final_val_loss"], ".4f"),
            _fmt(delta, "+.4f"),
            reach,
            _fmt(None if r["speedup"] is None else 100 * r["speedup"], ".0f")
            + ("%" if r["speedup"] is not None else ""),
            _fmt(r["gini"], ".3f"),
            _fmt(r["min_max_ratio"], ".3f"),
            _fmt(r["cv"], ".3f"),
            _fmt(r["max_violation"], ".3f"),
            _fmt(r["ema_gini"], ".3f"),
            _fmt(r["ema_min_max"], ".3f"),
            _fmt(r["drop_fraction"], ".3f"),
            _fmt(r["pes_min"], ".4f"),
            _fmt(r["tokens_per_s"], ",.0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
