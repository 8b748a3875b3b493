"""What a comparison runs: the options, the plan (arms, seeds, report settings) and one job per
(arm, seed) with its validated config (``runner.py`` has the whole flow).

1. ``make_plan``: the comparison file (a training config, optionally with a ``compare:``
   section: ``presets.py``), ``--set`` overrides and ``--steps``; ``compare.prepare``'s data made
   (``prepare.py``) or only named.
2. ``build_jobs``: each arm's router and losses (``variants.apply_variant``), its own ``set``
   overrides and, with seeds, ``run.seed`` (an arm with its own ``seeds`` runs only those);
   every config validated before anything runs. Seed-major, so a partial comparison holds
   whole seeds.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    report_only: bool = False  # tabulate finished runs; train, resume or delete nothing


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
        claims=[c for c in section.claims if c.arm in names and (c.versus or baseline) in names],
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
            if seed is not None and variant.seeds is not None and seed not in variant.seeds:
                continue
            data = apply_variant(base, variant)
            set_errors = apply_overrides(data, variant.overrides)
            if set_errors:
                all_errors += [f"arm {name}: compare.arms.{name}.set: {e}" for e in set_errors]
                continue
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
