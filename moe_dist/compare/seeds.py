"""Seeds as an axis of the comparison: statistics over seeds and a verdict per claim.

Input: the per-seed table rows of ``report.summarize`` (one list of rows per seed, each seed's
rows compared with THAT seed's baseline: the iso-loss target is the baseline's final validation
loss in the same seed, and each seed draws its own validation batches).

Per arm (`aggregate`): mean and sample standard deviation (n - 1) over seeds of each metric, the
values of every seed, and the paired difference to the baseline seed by seed (mean, std).

Per claim (`judge_claims`): the paired differences d_s = arm_s - baseline_s (or the claim's
``versus`` arm) of the claim's
metric, signed so that positive means "as the paper says" (``better: lower`` flips the sign).
The seed-to-seed spread is the larger of the two arms' standard deviations over the claim's
seeds (those both arms ran, below). Verdict:

- ``holds``: every seed agrees in sign and |mean d| exceeds the spread;
- ``opposite``: the same, with the sign against the paper;
- ``within spread``: otherwise (the difference is not larger than the seed-to-seed spread, or
  the seeds disagree).

For ``speedup`` a seed in which the arm never reaches the baseline's final loss counts as -inf
(not faster); a run missing a metric (n/a) makes the claim ``not measured``. An arm that runs
only some seeds (``compare.arms.NAME.seeds``) is judged on the seeds both arms of the claim run
(``planned``); a planned run that failed still makes the claim ``not measured``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moe_dist.compare.presets import ClaimSpec

METRICS = (
    "final_val_loss",
    "tokens_to_baseline",
    "speedup",
    "gini",
    "min_max_ratio",
    "ema_gini",
    "ema_min_max",
    "pes_min",
    "drop_fraction",
)


def _stats(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    mean = float(np.mean(vals)) if vals else None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)
    return {"mean": mean, "std": std, "values": values, "n": len(vals)}


def aggregate(
    per_seed: dict[Any, list[dict[str, Any]]], arms: list[str], baseline: str
) -> list[dict[str, Any]]:
    """One row per arm: ``{arm, seeds, <metric>: {mean, std, values, n}, delta_val_loss: {...}}``."""
    by_seed = {s: {r["variant"]: r for r in rows} for s, rows in per_seed.items()}
    out = []
    for arm in arms:
        rows = [by_seed[s].get(arm) for s in per_seed]
        row: dict[str, Any] = {"arm": arm, "seeds": list(per_seed)}
        for metric in METRICS:
            row[metric] = _stats([r.get(metric) if r else None for r in rows])
        deltas = []
        for s in per_seed:
            a, b = by_seed[s].get(arm), by_seed[s].get(baseline)
            ok = a and b and a["final_val_loss"] is not None and b["final_val_loss"] is not None
            deltas.append(a["final_val_loss"] - b["final_val_loss"] if ok else None)
        row["delta_val_loss"] = _stats(deltas)
        out.append(row)
    return out


def _metric(row: dict[str, Any] | None, metric: str) -> float | None:
    if row is None:
        return None
    v = row.get(metric)
    if metric == "speedup" and v is None and row.get("final_val_loss") is not None:
        return -math.inf  # never reached the baseline's final loss
    return v


def _std_over(by_seed: dict[Any, dict[str, Any]], arm: str, metric: str, seeds: list[Any]) -> float:
    """The arm's standard deviation of ``metric`` over ``seeds`` (0 for fewer than two values)."""
    return _stats([(by_seed[s].get(arm) or {}).get(metric) for s in seeds])["std"] or 0.0


def judge_claims(
    per_seed: dict[Any, list[dict[str, Any]]],
    claims: list[ClaimSpec],
    baseline: str,
    planned: dict[str, list[Any]] | None = None,
) -> list[dict[str, Any]]:
    """A verdict per claim (module docstring), with the numbers it rests on; ``planned``: the
    seeds each arm was to run (default: every seed for every arm)."""
    by_seed = {s: {r["variant"]: r for r in rows} for s, rows in per_seed.items()}
    out = []
    for claim in claims:
        sign = -1.0 if claim.better == "lower" else 1.0
        versus = claim.versus or baseline
        both = [
            s
            for s in per_seed
            if planned is None or (s in planned.get(claim.arm, []) and s in planned.get(versus, []))
        ]
        arm_v = [_metric(by_seed[s].get(claim.arm), claim.metric) for s in both]
        base_v = [_metric(by_seed[s].get(versus), claim.metric) for s in both]
        entry: dict[str, Any] = {
            **claim.model_dump(),
            "baseline": versus,
            "seeds": both,
            "arm_values": arm_v,
            "baseline_values": base_v,
        }
        if not both or any(v is None for v in arm_v + base_v):
            out.append(entry | {"verdict": "not measured"})
            continue
        d = [sign * (a - b) for a, b in zip(arm_v, base_v)]
        finite = [x for x in d if math.isfinite(x)]
        spread = max(_std_over(by_seed, a, claim.metric, both) for a in (claim.arm, versus))
        mean_d = float(np.mean(d)) if len(finite) == len(d) else (-math.inf if any(x < 0 for x in d) else 0.0)
        if all(x > 0 for x in d) and abs(mean_d) > spread:
            verdict = "holds"
        elif all(x < 0 for x in d) and abs(mean_d) > spread:
            verdict = "opposite"
        else:
            verdict = "within spread"
        entry |= {"differences": d, "mean_difference": mean_d, "spread": spread, "verdict": verdict}
        out.append(entry)
    return out


def _pm(stat: dict[str, Any], spec: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{format(stat['mean'], spec)} ± {format(stat['std'], spec)}"


def _each(stat: dict[str, Any], spec: str) -> str:
    return " / ".join("n/a" if v is None else format(v, spec) for v in stat["values"])


def _tokens(v: float | None) -> str:
    if v is None:
        return "never"
    return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,.0f}"


def markdown_table(seed_rows: list[dict[str, Any]], baseline: str) -> str:
    """Mean ± std over seeds, and every seed's value (seeds in the order of the run)."""
    seeds = seed_rows[0]["seeds"] if seed_rows else []
    head = (
        f"| arm | final val loss (mean ± std) | Δ vs {baseline} (each seed) | tokens to {baseline}'s final "
        "loss (each seed) | EMA Gini | EMA min/max | Gini (last N) | min/max (last N) | PES min | "
        "drop @cf1.0 |"
    )
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; ± is the sample std over seeds.",
        "",
        head,
        "|" + "---|" * 10,
    ]
    for r in seed_rows:
        cells = [
            r["arm"],
            f"{_pm(r['final_val_loss'], '.4f')} ({_each(r['final_val_loss'], '.4f')})",
            f"{_pm(r['delta_val_loss'], '+.4f')} ({_each(r['delta_val_loss'], '+.4f')})",
            " / ".join(
                "n/a" if loss is None else _tokens(v)  # n/a: no run in that seed; never: not reached
                for v, loss in zip(r["tokens_to_baseline"]["values"], r["final_val_loss"]["values"])
            ),
            _pm(r["ema_gini"], ".3f"),
            _pm(r["ema_min_max"], ".3f"),
            _pm(r["gini"], ".3f"),
            _pm(r["min_max_ratio"], ".3f"),
            _pm(r["pes_min"], ".4f"),
            _pm(r["drop_fraction"], ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seed_list(claim: dict[str, Any]) -> str:
    seeds = claim.get("seeds")
    return f" ({', '.join(map(str, seeds))})" if seeds else ""


def claim_lines(claims: list[dict[str, Any]]) -> list[str]:
    """One Markdown bullet per claim: what, the per-seed differences, the spread, the verdict."""
    lines = []
    for c in claims:
        head = f"- **{c['text']}** ({c['arm']} vs {c['baseline']}, {c['metric']}, {c['better']} is better): "
        if c["verdict"] == "not measured":
            lines.append(head + "not measured (a run is missing the metric).")
            continue
        d = ", ".join("never" if not math.isfinite(x) else f"{x:+.4g}" for x in c["differences"])
        lines.append(
            head + f"difference in the paper's direction per seed{_seed_list(c)} {d}; "
            f"mean {c['mean_difference']:+.4g}, "
            f"seed-to-seed spread {c['spread']:.4g}: **{c['verdict']}**."
        )
    return lines
