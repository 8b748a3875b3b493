"""Runs of an earlier comparison, restored from its committed files so a comparison can continue.

``docs/results/<preset>/`` keeps, per finished run ``<arm>_seed<N>``, the exact config
(``configs/<key>.yaml``), the gzipped metrics log (``logs/<key>.metrics.jsonl.gz``) and, in
``results.json``, the final-model analysis (``status.<key>.final_model``: drops, PES); the
checkpoints are not kept. ``restore_runs`` puts such a run back into ``OUT/runs/<arm>/seed<N>/``
so that ``moe-dist compare`` reuses it (``runner.run_state`` = ``finished``) instead of training
it again:

1. Only when the archived config, validated by today's schema, EQUALS the config the comparison
   would run (``runner.same_run``, the same test as for reusing a live run directory: keys that
   only change what is measured are left out); otherwise the run is left to train, and the
   reason is returned.
2. Only when the archive's PES sample size equals the comparison's (the analysis is reused as it
   is; without the checkpoint it cannot be redone).
3. Never over a run directory that already holds a finished run.

The restored directory holds ``config.json``, ``metrics.jsonl``, ``final_model.json`` (the cached
analysis ``runner`` reads) and ``summary.json`` with ``restored_from`` naming the archive: it is
not the summary the training wrote. Whether the code of today reproduces the archived runs is a
separate check (run one archived config for a few steps and compare the losses bit for bit:
docs/results.md says where that was done).

    python -m moe_dist.compare.archive docs/results/lpr_paper configs/compare/lpr_paper.yaml \\
        --out runs/compare_lpr_paper
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

from moe_dist.compare.plan import CompareOptions, Job, build_jobs, make_plan
from moe_dist.compare.runner import run_state, same_run
from moe_dist.config import ConfigError, config_from_dict, config_to_dict, read_yaml


def _archived_config(path: Path) -> dict[str, Any]:
    return config_to_dict(config_from_dict(read_yaml(path), str(path)))


def restore_runs(archive: Path, jobs: list[Job], pes_tokens: int) -> dict[str, str]:
    """Restore every job the archive holds with an identical config; job key -> what happened."""
    try:
        results = json.loads((archive / "results.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError([f"archive {archive}: no readable results.json ({exc})"]) from None
    out: dict[str, str] = {}
    for job in jobs:
        cfg_path = archive / "configs" / f"{job.key}.yaml"
        log_path = archive / "logs" / f"{job.key}.metrics.jsonl.gz"
        analysis = results.get("status", {}).get(job.key, {}).get("final_model")
        if not (cfg_path.is_file() and log_path.is_file() and analysis):
            out[job.key] = "not in the archive"
            continue
        if results.get("pes_tokens") != pes_tokens:
            out[job.key] = f"archived PES on {results.get('pes_tokens')} tokens, this comparison {pes_tokens}"
            continue
        try:
            same = same_run(_archived_config(cfg_path), job.cfg)
        except ConfigError as exc:
            out[job.key] = f"archived config invalid today: {'; '.join(exc.errors)}"
            continue
        if not same:
            out[job.key] = "archived config differs from this comparison's"
            continue
        if run_state(job.run_dir, job.cfg) == "finished":
            out[job.key] = "already finished here"
            continue
        job.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in job.run_dir.iterdir():  # an unfinished or other run: the archive replaces it
            if stale.is_file():
                stale.unlink()
        (job.run_dir / "metrics.jsonl").write_bytes(gzip.decompress(log_path.read_bytes()))
        (job.run_dir / "final_model.json").write_text(
            json.dumps({"pes_tokens_asked": pes_tokens, "analysis": analysis})
        )
        (job.run_dir / "summary.json").write_text(
            json.dumps({"restored_from": str(archive), "key": job.key, "command": results.get("command")})
        )
        (job.run_dir / "config.json").write_text(json.dumps(job.cfg))  # last: marks the run complete
        out[job.key] = "restored"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_dist.compare.archive", description=__doc__.split("\n")[0])
    p.add_argument("archive", help="a committed results folder, e.g. docs/results/lpr_paper")
    p.add_argument("config", help="the comparison file, e.g. configs/compare/lpr_paper.yaml")
    p.add_argument("--out", required=True, help="the comparison's OUT")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the file's)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        opts = CompareOptions(config=args.config, variants=None, out=Path(args.out), seeds=seeds)
        plan, base = make_plan(opts, prepare=False)
        done = restore_runs(Path(args.archive), build_jobs(opts, plan, base), plan.pes_tokens)
    except (ConfigError, ValueError) as exc:
        errors = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
        print("error: " + "; ".join(errors), file=sys.stderr)
        return 2
    for key, what in done.items():
        print(f"{key}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
