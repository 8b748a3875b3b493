"""``moe-dist compare``: train every arm of one base config (and seed), then write the table and plots.

1. Configs (``plan.py``): the comparison file (a training config, optionally with a ``compare:`` section:
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
5. Report (``results_files.py``): ``OUT/results.md`` (tables), ``OUT/results.json`` (every
   number, per layer and per seed too) and the PNGs, all computed from the metrics logs the
   runs wrote; with seeds, ``seeds.py`` adds mean +- std over seeds, iso-loss per seed and a
   line per claim.
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
from pathlib import Path
from typing import Any

import yaml

from moe_dist.compare import final_model, report
from moe_dist.compare.plan import CompareOptions, Job, Plan, build_jobs, make_plan
from moe_dist.compare.results_files import write_report
from moe_dist.config import ConfigError, config_from_dict, config_to_dict


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


# Keys that only say what is measured about a run, never what it computes (losses, counts,
# weights): a run saved with another value is the same run. telemetry.timing changed its default
# from true to None ("on CPU only") after runs of the paper presets had been saved.
NOT_RUN_IDENTITY = (("telemetry", "timing"),)


def same_run(saved: dict[str, Any], cfg: dict[str, Any]) -> bool:
    """Whether two resolved configs (``config_to_dict``) describe the same run."""

    def identity(d: dict[str, Any]) -> dict[str, Any]:
        d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
        for section, key in NOT_RUN_IDENTITY:
            if isinstance(d.get(section), dict):
                d[section].pop(key, None)
        return d

    return identity(saved) == identity(cfg)


def _saved_config_matches(run_dir: Path, cfg: dict[str, Any]) -> bool:
    """The run directory holds a run of exactly this config (``same_run``). The saved config is
    re-validated first, so a run saved before the schema gained a (defaulted) key still matches."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        return same_run(config_to_dict(config_from_dict(saved)), cfg)
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


def _final_model(run_dir: Path, pes_tokens: int, reuse: bool) -> dict[str, Any]:
    """``final_model.analyze_final_model``, kept in ``run_dir/final_model.json``: a reused run with
    the same PES sample size is not analysed again (a trained or resumed one always is)."""
    cache = run_dir / "final_model.json"
    if reuse:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("pes_tokens_asked") == pes_tokens:
                return cached["analysis"]
        except (OSError, ValueError, KeyError):
            pass
    analysis = final_model.analyze_final_model(run_dir, pes_tokens=pes_tokens)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pes_tokens_asked": pes_tokens, "analysis": analysis}))
    os.replace(tmp, cache)
    return analysis


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
            status[job.key]["final_model"] = _final_model(
                job.run_dir, plan.pes_tokens, reuse=state == "finished"
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


def _not_finished(jobs: list[Job]) -> list[str]:
    """``key (why)`` of each job whose run directory does not hold a finished run of its config."""
    why = {"resume": "unfinished", "fresh": "missing, or trained with a different config"}
    states = [(job.key, run_state(job.run_dir, job.cfg)) for job in jobs]
    return [f"{key} ({why[state]})" for key, state in states if state != "finished"]


def compare(opts: CompareOptions) -> int:
    progress = _Progress(opts.quiet)
    plan, base = make_plan(opts)
    if plan.baseline not in plan.variants:
        progress.say(f"baseline {plan.baseline!r} is not among the arms: no iso-loss column")
    jobs = build_jobs(opts, plan, base)
    if opts.report_only:
        unfinished = _not_finished(jobs)
        if unfinished:
            print(
                f"error: --report-only: {len(unfinished)} run(s) in {opts.out / 'runs'} are not finished "
                "runs of this comparison's configs (nothing was trained or removed): "
                + ", ".join(unfinished),
                file=sys.stderr,
            )
            return 2
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
