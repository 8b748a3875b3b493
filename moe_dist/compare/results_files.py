"""A comparison's result files: ``results.json`` (every number, per layer and per seed),
``results.md`` (the tables, claims and plots) and the PNGs, all from the metrics logs the runs wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moe_dist.compare import plots, report, seeds
from moe_dist.compare.arm_logs import RunLog, read_run_log
from moe_dist.compare.plan import CompareOptions, Job, Plan, command_line


def write_report(
    opts: CompareOptions, plan: Plan, jobs: list[Job], status: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """results.json, results.md and the PNGs from the metrics logs of the runs that finished."""
    failed = [j.key for j in jobs if status.get(j.key, {}).get("returncode") != 0]
    per_seed: dict[int | None, list[dict[str, Any]]] = {}
    logs_by_seed: dict[int | None, dict[str, RunLog]] = {}
    for seed in plan.seeds or [None]:
        logs = {
            j.arm: read_run_log(j.run_dir / "metrics.jsonl", j.arm)
            for j in jobs
            if j.seed == seed and j.key not in failed
        }
        finals = {j.arm: status.get(j.key, {}).get("final_model", {}) for j in jobs if j.seed == seed}
        per_seed[seed] = report.summarize(logs, finals, plan.baseline, plan.last_n)
        logs_by_seed[seed] = logs
    any_cfg = jobs[0].cfg
    results: dict[str, Any] = {
        "command": command_line(opts),
        "baseline": plan.baseline,
        "last_n": plan.last_n,
        "pes_tokens": plan.pes_tokens,
        "variants": {n: v.description for n, v in plan.variants.items()},
        "failed": failed,
        "status": status,
        "base_config": {k: v for k, v in any_cfg.items() if k != "run"} | {"seed": any_cfg["run"]["seed"]},
        "machine": {
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "parallel": plan.parallel,
            "nproc": opts.nproc,
        },
    }
    if plan.seeds is None:
        results["rows"] = per_seed[None]
    else:
        results["seeds"] = plan.seeds
        results["rows_per_seed"] = {str(s): rows for s, rows in per_seed.items()}
        results["seed_rows"] = seeds.aggregate(per_seed, list(plan.variants), plan.baseline)
        planned: dict[str, list[Any]] = {}
        for j in jobs:
            planned.setdefault(j.arm, []).append(j.seed)
        results["claims"] = seeds.judge_claims(per_seed, plan.claims, plan.baseline, planned)
    (opts.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    pngs = plots.plot_all(logs_by_seed, plan.baseline, opts.out) if any(logs_by_seed.values()) else []
    (opts.out / "results.md").write_text(results_markdown(results, per_seed, pngs, plan))
    return results


def results_markdown(
    results: dict[str, Any], per_seed: dict[int | None, list[dict[str, Any]]], pngs: list[Path], plan: Plan
) -> str:
    cfg = results["base_config"]
    m, s, d = cfg["model"], cfg["schedule"], cfg["data"]
    router = m["moe"]["router"]
    k = router.get("top_k", router.get("capacity_factor"))
    seeds_text = f"seeds {', '.join(map(str, plan.seeds))}" if plan.seeds else f"seed {cfg['seed']}"
    lines = [
        "# Router comparison",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model: dim {m['dim']}, {m['n_layers']} layers, {m['moe']['num_experts']} experts, top-{k}, "
        f"expert FFN {m['moe']['experts']['ffn_hidden_size']}; {s['steps']} steps of "
        f"{d['micro_batch_size']} x {d['seq_len']} tokens per rank x {d['grad_accum']} micro-batches, "
        f"lr {cfg['optim']['lr']} ({s['kind']}), {seeds_text}.",
        "",
    ]
    if plan.seeds:
        lines += [seeds.markdown_table(results["seed_rows"], plan.baseline), ""]
        lines += seeds.claim_lines(results["claims"]) + [""]
        for seed, rows in per_seed.items():
            lines += [f"## Seed {seed}", "", report.markdown_table(rows, plan.baseline)]
    else:
        lines += [report.markdown_table(per_seed[None], plan.baseline)]
    lines += [
        f"Load metrics (Gini, min/max, CV, MaxVio) are over the global counts of the last {plan.last_n} "
        "steps, mean over layers; EMA columns are LPR's 0.99 EMA of per-step counts (its Gini and "
        "min/max), mean over layers. Drops: fraction of token-slots over ceil(1.0 * slots / E) per expert, "
        f"final model, validation batches. PES: SimBal's mean pairwise cosine of all experts' outputs on "
        f"{plan.pes_tokens} randomly sampled validation tokens, final model, min over layers.",
        "",
    ]
    if results["failed"]:
        lines += [f"Failed: {', '.join(results['failed'])} (see runs/<arm>/.../train.log).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"
