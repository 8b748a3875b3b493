"""``moe-dist compare``: train every arm of one base config (and seed), then write the table and plots.

1. Configs: the comparison file (a training config, optionally with a ``compare:`` section:
   ``presets.py``) + ``--set`` overrides + ``--steps``; its ``compare.prepare`` data is made
   first (``prepare.py``); then each arm's router and losses (``variants.apply_variant``) and,
   with seeds, ``run.seed``. Every config is validated before anything runs and written to
   ``OUT/configs/<arm>[_seed<N>].yaml`` (the exact config of the run).
2. Runs: each (arm, seed) is ``python -m moe_dist.cli train CONFIG --resume`` in its own
   subprocess (``torch.distributed.run --nproc-per-node N`` with ``--nproc N``), ``--parallel K``
   at a time; output in ``OUT/runs/<arm>/`` (one seed, no ``--seeds``) or
   ``OUT/runs/<arm>/seed<N>/`` (metrics.jsonl, config.json, summary.json, checkpoints,
   train.log). A failed run is reported and the others go on. Training processes die with the
   compare (``PR_SET_PDEATHSIG``), so a killed compare leaves no orphan writing its directories.
3. Continuing: a run directory whose saved config equals the run's is reused when it finished
   (summary.json) and resumed from its newest checkpoint otherwise (``train --resume``: the
   metrics log is cut back to the checkpoint's step and the same steps are redone, bit for bit);
   a directory with another config is cleared and trained again. So re-running a killed
   compare's command continues it; ``--fresh`` clears every run first.
4. Final model: as each run ends, ``final_model.analyze_final_model`` (drops at capacity factor
   1.0, PES on sampled validation tokens) on its final checkpoint.
5. Report: ``OUT/results.md`` (tables), ``OUT/results.json`` (every number, per layer and per
   seed too) and the PNGs, all computed from the metrics logs the runs wrote; with seeds,
   ``seeds.py`` adds mean +- std over seeds, iso-loss per seed and a line per claim.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_dist.compare import final_model, plots, report, seeds
from moe_dist.compare.arm_logs import RunLog, read_run_log
from moe_dist.compare.prepare import prepare_data, prepared_data_config
from moe_dist.compare.presets import ClaimSpec, split_compare_file
from moe_dist.compare.variants import BASELINE, DEFAULT_VARIANTS, VARIANTS, Variant, apply_variant
from moe_dist.config import ConfigError, apply_overrides, config_from_dict, config_to_dict


@dataclass
class CompareOptions:
    """The command line; None = the comparison file's ``compare:`` value, else the built-in default."""

    config: str | None
    variants: list[str] | None
    out: Path
    steps: int | None = None
    parallel: int | None = None
    nproc: int = 1
    overrides: list[str] = field(default_factory=list)
    baseline: str | None = None
    last_n: int | None = None
    pes_tokens: int | None = None
    seeds: list[int] | None = None
    fresh: bool = False
    quiet: bool = False


@dataclass
class Plan:
    """What runs: the arms (in order), seeds (None: one run per arm with the config's seed, in
    ``runs/<arm>``), and the report's settings."""

    variants: dict[str, Variant]
    baseline: str
    seeds: list[int] | None
    parallel: int
    last_n: int
    pes_tokens: int
    claims: list[ClaimSpec]


@dataclass
class Job:
    arm: str
    seed: int | None
    run_dir: Path
    cfg: dict[str, Any]

    @property
    def key(self) -> str:
        return self.arm if self.seed is None else f"{self.arm}_seed{self.seed}"


def make_plan(opts: CompareOptions, prepare: bool = True) -> tuple[Plan, dict[str, Any]]:
    """The plan and the raw base config (overrides, steps and prepared data applied; with
    ``prepare`` false the data is only named, not made)."""
    base, section = split_compare_file(opts.config)
    known = section.variants() or VARIANTS
    names = opts.variants or list(section.arms) or DEFAULT_VARIANTS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError([f"--variants: unknown arm(s) {', '.join(unknown)}; known: {', '.join(known)}"])
    baseline = opts.baseline or section.baseline or BASELINE
    if baseline not in known:
        raise ConfigError([f"--baseline: unknown arm {baseline!r}; known: {', '.join(known)}"])
    errors = apply_overrides(base, opts.overrides)
    if errors:
        raise ConfigError(errors, opts.config)
    if opts.steps is not None:
        sched = base.setdefault("schedule", {})
        sched["steps"] = opts.steps
        sched["warmup_steps"] = min(int(sched.get("warmup_steps", 20)), opts.steps)
        if sched.get("decay_steps") is not None:
            sched["decay_steps"] = min(int(sched["decay_steps"]), opts.steps - sched["warmup_steps"])
    if opts.nproc > 1:
        base.setdefault("parallel", {}).setdefault("ep_size", opts.nproc)
    plan = Plan(
        variants={n: known[n] for n in names},
        baseline=baseline,
        seeds=opts.seeds if opts.seeds is not None else (section.seeds or None),
        parallel=opts.parallel or section.parallel or 1,
        last_n=opts.last_n or section.last_n or 100,
        pes_tokens=opts.pes_tokens or section.pes_tokens or 1024,
        claims=[c for c in section.claims if c.arm in names and baseline in names],
    )
    if section.prepare is not None:
        data = base.setdefault("data", {})
        if prepare:
            data.update(prepare_data(section.prepare, say=lambda m: print(f"[compare] {m}", file=sys.stderr)))
        else:
            data.update(prepared_data_config(section.prepare))
    return plan, base


def build_jobs(opts: CompareOptions, plan: Plan, base: dict[str, Any]) -> list[Job]:
    """Validated configs, one per (arm, seed); raises ConfigError naming the arm and the key."""
    runs = opts.out / "runs"
    base.setdefault("run", {})["out_dir"] = str(runs)
    config_from_dict(base, opts.config)  # errors of the base once, not once per arm
    jobs: list[Job] = []
    all_errors: list[str] = []
    for seed in plan.seeds or [None]:  # seed-major: a partial comparison holds whole seeds
        for name, variant in plan.variants.items():
            data = apply_variant(base, variant)
            if seed is None:
                data["run"]["name"] = name
            else:
                data["run"].update(out_dir=str(runs / name), name=f"seed{seed}", seed=seed)
            try:
                cfg = config_to_dict(config_from_dict(data))
            except ConfigError as exc:
                all_errors += [f"arm {name}: {e}" for e in exc.errors]
                continue
            run_dir = Path(cfg["run"]["out_dir"]) / cfg["run"]["name"]
            jobs.append(Job(name, seed, run_dir, cfg))
    if all_errors:
        raise ConfigError(all_errors, opts.config)
    return jobs


def build_configs(opts: CompareOptions) -> dict[str, dict[str, Any]]:
    """Every run's validated config by job key (``arm`` or ``arm_seed<N>``), without preparing data."""
    plan, base = make_plan(opts, prepare=False)
    return {job.key: job.cfg for job in build_jobs(opts, plan, base)}


def train_command(config_path: Path, nproc: int) -> list[str]:
    """``train CONFIG --resume``: a fresh start when the run has no checkpoint yet."""
    train = ["-m", "moe_dist.cli", "train", str(config_path), "--resume"]
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *train,
        ]
    return [sys.executable, *train]


def _saved_config_matches(run_dir: Path, cfg: dict[str, Any]) -> bool:
    """The run directory holds a run of exactly this config. The saved config is re-validated
    first, so a run saved before the schema gained a (defaulted) key still matches."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        return config_to_dict(config_from_dict(saved)) == cfg
    except (OSError, ValueError, ConfigError):
        return False


def run_state(run_dir: Path, cfg: dict[str, Any]) -> str:
    """``finished`` (reuse), ``resume`` (same config, not finished) or ``fresh`` (clear, train)."""
    if not _saved_config_matches(run_dir, cfg):
        return "fresh"
    return "finished" if (run_dir / "summary.json").is_file() else "resume"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the compare process dies (Linux), so a killed
    compare leaves no training process behind that would write into a run being resumed."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet, self.t0 = quiet, time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[compare {time.perf_counter() - self.t0:6.0f}s] {text}", file=sys.stderr, flush=True)


def run_jobs(
    jobs: list[Job], opts: CompareOptions, plan: Plan, progress: _Progress
) -> dict[str, dict[str, Any]]:
    """Train the jobs, ``plan.parallel`` at a time; returns per job key rc, seconds and analysis."""
    (opts.out / "configs").mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, float, Any]] = {}
    status: dict[str, dict[str, Any]] = {}
    env = dict(os.environ)
    threads = jobs[0].cfg["run"].get("threads") if jobs else None
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)

    def finish(job: Job, rc: int, seconds: float, state: str) -> None:
        status[job.key] = {"returncode": rc, "seconds": seconds, "state": state}
        if rc != 0:
            progress.say(f"{job.key}: FAILED (exit {rc}); see {job.run_dir / 'train.log'}")
            return
        progress.say(f"{job.key}: trained in {seconds:.0f}s; analysing the final model")
        try:
            status[job.key]["final_model"] = final_model.analyze_final_model(
                job.run_dir, pes_tokens=plan.pes_tokens
            )
        except Exception as exc:  # noqa: BLE001 - the table says n/a and why; the others go on
            status[job.key]["final_model_error"] = f"{type(exc).__name__}: {exc}"
            progress.say(f"{job.key}: final-model analysis failed: {exc}")

    try:
        while pending or running:
            while pending and len(running) < plan.parallel:
                job = pending.pop(0)
                cfg_path = opts.out / "configs" / f"{job.key}.yaml"
                cfg_path.write_text(yaml.safe_dump(job.cfg, sort_keys=False))
                state = "fresh" if opts.fresh else run_state(job.run_dir, job.cfg)
                if state == "finished":
                    progress.say(f"{job.key}: reusing the finished run in {job.run_dir}")
                    finish(job, 0, 0.0, state)
                    continue
                if state == "fresh" and job.run_dir.exists():
                    shutil.rmtree(job.run_dir)
                job.run_dir.mkdir(parents=True, exist_ok=True)
                log_fh = open(job.run_dir / "train.log", "a")  # noqa: SIM115 - closed when the run ends
                cmd = train_command(cfg_path, opts.nproc)
                progress.say(
                    f"{job.key}: {'resuming' if state == 'resume' else 'started'}: {shlex.join(cmd)}"
                )
                proc = subprocess.Popen(
                    cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
                )
                running[job.key] = (job, proc, time.perf_counter(), log_fh)
            time.sleep(0.2)
            for key, (job, proc, t0, log_fh) in list(running.items()):
                rc = proc.poll()
                if rc is not None:
                    log_fh.close()
                    del running[key]
                    finish(job, rc, time.perf_counter() - t0, "trained")
    finally:
        for _, proc, _, log_fh in running.values():  # interrupted: end only the runs we started
            proc.terminate()
            proc.wait()
            log_fh.close()
    return status


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
        results["claims"] = seeds.judge_claims(results["seed_rows"], per_seed, plan.claims, plan.baseline)
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


def command_line(opts: CompareOptions) -> str:
    """The ``moe-dist compare`` command that reproduces ``opts``."""
    argv = ["moe-dist", "compare", *([opts.config] if opts.config else [])]
    if opts.variants:
        argv += ["--variants", ",".join(opts.variants)]
    argv += ["--out", str(opts.out)]
    for flag, value in [
        ("--steps", opts.steps),
        ("--parallel", opts.parallel),
        ("--baseline", opts.baseline),
        ("--last-n", opts.last_n),
        ("--pes-tokens", opts.pes_tokens),
    ]:
        if value is not None:
            argv += [flag, str(value)]
    if opts.nproc != 1:
        argv += ["--nproc", str(opts.nproc)]
    if opts.seeds is not None:
        argv += ["--seeds", ",".join(map(str, opts.seeds))]
    for item in opts.overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def compare(opts: CompareOptions) -> int:
    progress = _Progress(opts.quiet)
    plan, base = make_plan(opts)
    if plan.baseline not in plan.variants:
        progress.say(f"baseline {plan.baseline!r} is not among the arms: no iso-loss column")
    jobs = build_jobs(opts, plan, base)
    opts.out.mkdir(parents=True, exist_ok=True)
    status = run_jobs(jobs, opts, plan, progress)
    results = write_report(opts, plan, jobs, status)
    progress.say(f"table: {opts.out / 'results.md'}")
    if not opts.quiet:
        print(
            (opts.out / "results.md").read_text().split("\n## Seed")[0]
            if plan.seeds
            else report.markdown_table(results["rows"], plan.baseline)
        )
    return 1 if results["failed"] else 0
