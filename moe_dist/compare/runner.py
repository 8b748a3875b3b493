"""``moe-dist compare``: train every variant of one base config, then write the table and plots.

1. Configs: base YAML + ``--set`` overrides + ``--steps``, then each variant's router and
   losses (``variants.apply_variant``); every config is validated before anything runs, and
   written to ``OUT/configs/<variant>.yaml`` (the exact config of the run).
2. Runs: each variant is ``python -m moe_dist.cli train OUT/configs/<variant>.yaml`` in its own
   subprocess (``torch.distributed.run --nproc-per-node N`` with ``--nproc N``), ``--parallel K``
   of them at a time; output in ``OUT/runs/<variant>/`` (metrics.jsonl, config.json, summary.json,
   checkpoints, train.log). A failed variant is reported and the others go on.
3. Final model: as each run ends, ``final_model.analyze_final_model`` (drops at capacity factor
   1.0, PES) on its final checkpoint.
4. Report: ``OUT/results.md`` (table), ``OUT/results.json`` (every number, per layer too) and the
   PNGs, all computed from the metrics logs the runs wrote.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_dist.compare import final_model, plots, report
from moe_dist.compare.arm_logs import RunLog, read_run_log
from moe_dist.compare.variants import BASELINE, VARIANTS, apply_variant
from moe_dist.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, read_yaml


@dataclass
class CompareOptions:
    config: str | None
    variants: list[str]
    out: Path
    steps: int | None = None
    parallel: int = 1
    nproc: int = 1
    overrides: list[str] = field(default_factory=list)
    baseline: str = BASELINE
    last_n: int = 100
    pes_tokens: int = 1024
    reuse: bool = False
    quiet: bool = False


def build_configs(opts: CompareOptions) -> dict[str, dict[str, Any]]:
    """Validated config dicts per variant; raises ConfigError naming the variant and the key."""
    base = read_yaml(opts.config) if opts.config else {}
    errors = apply_overrides(base, opts.overrides)
    if errors:
        raise ConfigError(errors, opts.config)
    if opts.steps is not None:
        sched = base.setdefault("schedule", {})
        sched["steps"] = opts.steps
        sched["warmup_steps"] = min(int(sched.get("warmup_steps", 20)), opts.steps)
    if opts.nproc > 1:
        base.setdefault("parallel", {}).setdefault("ep_size", opts.nproc)
    run = base.setdefault("run", {})
    run["out_dir"] = str(opts.out / "runs")
    config_from_dict(base, opts.config)  # errors of the base once, not once per variant
    out: dict[str, dict[str, Any]] = {}
    all_errors: list[str] = []
    for name in opts.variants:
        data = apply_variant(base, name)
        data["run"]["name"] = name
        try:
            out[name] = config_to_dict(config_from_dict(data))
        except ConfigError as exc:
            all_errors += [f"variant {name}: {e}" for e in exc.errors]
    if all_errors:
        raise ConfigError(all_errors, opts.config)
    return out


def train_command(config_path: Path, nproc: int) -> list[str]:
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "moe_dist.cli",
            "train",
            str(config_path),
        ]
    return [sys.executable, "-m", "moe_dist.cli", "train", str(config_path)]


def _same_finished_run(run_dir: Path, cfg: dict[str, Any]) -> bool:
    """A finished run of this config is there (``--reuse``). The saved config is re-validated
    first, so a run saved before the config schema gained a (defaulted) key still matches."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        return (run_dir / "summary.json").is_file() and config_to_dict(config_from_dict(saved)) == cfg
    except (OSError, ValueError, ConfigError):
        return False


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet, self.t0 = quiet, time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[compare {time.perf_counter() - self.t0:6.0f}s] {text}", file=sys.stderr, flush=True)


def run_variants(
    configs: dict[str, dict[str, Any]], opts: CompareOptions, progress: _Progress
) -> dict[str, dict[str, Any]]:
    """Train the variants, ``opts.parallel`` at a time; returns per variant rc, seconds and analysis."""
    (opts.out / "configs").mkdir(parents=True, exist_ok=True)
    pending = list(configs)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    status: dict[str, dict[str, Any]] = {}
    env = dict(os.environ)
    threads = next(iter(configs.values()))["run"].get("threads")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)

    def finish(name: str, rc: int, seconds: float) -> None:
        status[name] = {"returncode": rc, "seconds": seconds}
        run_dir = opts.out / "runs" / name
        if rc != 0:
            progress.say(f"{name}: FAILED (exit {rc}); see {run_dir / 'train.log'}")
            return
        progress.say(f"{name}: trained in {seconds:.0f}s; analysing the final model")
        try:
            status[name]["final_model"] = final_model.analyze_final_model(run_dir, pes_tokens=opts.pes_tokens)
        except Exception as exc:  # noqa: BLE001 - the table says n/a and why; the others go on
            status[name]["final_model_error"] = f"{type(exc).__name__}: {exc}"
            progress.say(f"{name}: final-model analysis failed: {exc}")

    try:
        while pending or running:
            while pending and len(running) < opts.parallel:
                name = pending.pop(0)
                cfg_path = opts.out / "configs" / f"{name}.yaml"
                cfg_path.write_text(yaml.safe_dump(configs[name], sort_keys=False))
                run_dir = opts.out / "runs" / name
                if opts.reuse and _same_finished_run(run_dir, configs[name]):
                    progress.say(f"{name}: reusing the finished run in {run_dir}")
                    finish(name, 0, 0.0)
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                log_fh = open(run_dir / "train.log", "w")  # noqa: SIM115 - closed when the run ends
                cmd = train_command(cfg_path, opts.nproc)
                progress.say(f"{name}: started: {shlex.join(cmd)}")
                proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env)
                running[name] = (proc, time.perf_counter(), log_fh)
            time.sleep(0.2)
            for name, (proc, t0, log_fh) in list(running.items()):
                rc = proc.poll()
                if rc is not None:
                    log_fh.close()
                    del running[name]
                    finish(name, rc, time.perf_counter() - t0)
    finally:
        for proc, _, log_fh in running.values():  # interrupted: end only the runs we started
            proc.terminate()
            proc.wait()
            log_fh.close()
    return status


def write_report(
    opts: CompareOptions, configs: dict[str, dict[str, Any]], status: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """results.json, results.md and the PNGs from the metrics logs of the runs that finished."""
    logs: dict[str, RunLog] = {}
    for name in opts.variants:
        if status.get(name, {}).get("returncode") == 0:
            logs[name] = read_run_log(opts.out / "runs" / name / "metrics.jsonl", name)
    finals = {n: s.get("final_model", {}) for n, s in status.items()}
    rows = report.summarize(logs, finals, opts.baseline, opts.last_n)
    failed = [n for n in opts.variants if status.get(n, {}).get("returncode") != 0]
    any_cfg = next(iter(configs.values()))
    results = {
        "command": command_line(opts),
        "baseline": opts.baseline,
        "last_n": opts.last_n,
        "variants": {n: VARIANTS[n].description for n in opts.variants},
        "failed": failed,
        "status": status,
        "rows": rows,
        "base_config": {k: v for k, v in any_cfg.items() if k != "run"} | {"seed": any_cfg["run"]["seed"]},
        "machine": {
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "parallel": opts.parallel,
            "nproc": opts.nproc,
        },
    }
    (opts.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    pngs = plots.plot_all(logs, opts.baseline, opts.out) if logs else []
    (opts.out / "results.md").write_text(results_markdown(results, rows, pngs, opts))
    return results


def results_markdown(
    results: dict[str, Any], rows: list[dict[str, Any]], pngs: list[Path], opts: CompareOptions
) -> str:
    cfg = results["base_config"]
    m, s, d = cfg["model"], cfg["schedule"], cfg["data"]
    router = m["moe"]["router"]
    k = router.get("top_k", router.get("capacity_factor"))
    lines = [
        "# Router comparison",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model: dim {m['dim']}, {m['n_layers']} layers, {m['moe']['num_experts']} experts, top-{k}, "
        f"expert FFN {m['moe']['experts']['ffn_hidden_size']}; {s['steps']} steps of "
        f"{d['micro_batch_size']} x {d['seq_len']} tokens per rank, lr {cfg['optim']['lr']}, "
        f"seed {cfg['seed']}.",
        "",
        report.markdown_table(rows, opts.baseline),
        f"Load metrics (Gini, min/max, CV, MaxVio) are over the global counts of the last {opts.last_n} "
        "steps, mean over layers; EMA columns are LPR's 0.99 EMA of per-step counts. Drops: fraction of "
        "token-slots over ceil(1.0 * slots / E) per expert, final model, validation batches. PES: SimBal's "
        "mean pairwise cosine of all experts' outputs, final model, min over layers.",
        "",
    ]
    if results["failed"]:
        lines += [f"Failed: {', '.join(results['failed'])} (see runs/<variant>/train.log).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


def command_line(opts: CompareOptions) -> str:
    """The ``moe-dist compare`` command that reproduces ``opts``."""
    argv = [
        "moe-dist",
        "compare",
        *([opts.config] if opts.config else []),
        "--variants",
        ",".join(opts.variants),
        "--out",
        str(opts.out),
    ]
    for flag, value, default in [
        ("--steps", opts.steps, None),
        ("--parallel", opts.parallel, 1),
        ("--nproc", opts.nproc, 1),
        ("--baseline", opts.baseline, BASELINE),
        ("--last-n", opts.last_n, 100),
        ("--pes-tokens", opts.pes_tokens, 1024),
    ]:
        if value != default:
            argv += [flag, str(value)]
    for item in opts.overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def compare(opts: CompareOptions) -> int:
    progress = _Progress(opts.quiet)
    if opts.baseline not in opts.variants:
        progress.say(f"baseline {opts.baseline!r} is not among the variants: no iso-loss column")
    configs = build_configs(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    status = run_variants(configs, opts, progress)
    results = write_report(opts, configs, status)
    progress.say(f"table: {opts.out / 'results.md'}")
    if not opts.quiet:
        print(report.markdown_table(results["rows"], opts.baseline))
    return 1 if results["failed"] else 0
