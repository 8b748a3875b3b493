"""Restoring an earlier comparison's committed runs (`moe_dist.compare.archive`), with real configs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import yaml

from moe_dist.compare.archive import main, restore_runs
from moe_dist.compare.plan import CompareOptions, build_jobs, make_plan
from moe_dist.compare.runner import _final_model, run_state

ROOT = Path(__file__).resolve().parents[2]
PRESET = str(ROOT / "configs" / "compare" / "simbal_paper.yaml")


def _jobs(out: Path) -> tuple[list, int]:
    opts = CompareOptions(config=PRESET, variants=["seq_lbl", "simbal"], out=out, seeds=[1, 2])
    plan, base = make_plan(opts, prepare=False)
    return build_jobs(opts, plan, base), plan.pes_tokens


def _archive(tmp: Path, jobs: list, pes: int) -> Path:
    """An archive laid out as docs/results/<preset>/ holds it, for seed 1 of both arms."""
    arc = tmp / "archive"
    (arc / "configs").mkdir(parents=True)
    (arc / "logs").mkdir()
    status = {}
    for job in jobs:
        if job.seed != 1:
            continue
        (arc / "configs" / f"{job.key}.yaml").write_text(yaml.safe_dump(job.cfg, sort_keys=False))
        line = json.dumps({"step": 1, "loss": 8.0, "tokens": 2048, "layers": [], "val_loss": 7.5})
        (arc / "logs" / f"{job.key}.metrics.jsonl.gz").write_bytes(gzip.compress((line + "\n").encode()))
        status[job.key] = {"final_model": {"pes_min": 0.01, "drop_fraction": 0.1, "tag": job.key}}
    (arc / "results.json").write_text(json.dumps({"pes_tokens": pes, "status": status, "command": "x"}))
    return arc


def test_restore_identical_configs_only_and_the_runner_reuses_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs, pes = _jobs(out)
    arc = _archive(tmp_path, jobs, pes)
    # Make simbal's archived config differ in one value: it must not be restored.
    key = "simbal_seed1"
    cfg = yaml.safe_load((arc / "configs" / f"{key}.yaml").read_text())
    cfg["optim"]["lr"] = 1.0e-3
    (arc / "configs" / f"{key}.yaml").write_text(yaml.safe_dump(cfg))
    done = restore_runs(arc, jobs, pes)
    assert done == {
        "seq_lbl_seed1": "restored",
        "simbal_seed1": "archived config differs from this comparison's",
        "seq_lbl_seed2": "not in the archive",
        "simbal_seed2": "not in the archive",
    }
    by_key = {j.key: j for j in jobs}
    job = by_key["seq_lbl_seed1"]
    assert run_state(job.run_dir, job.cfg) == "finished"
    assert run_state(by_key[key].run_dir, by_key[key].cfg) == "fresh"
    # The runner takes the archived analysis as it is (there is no checkpoint to analyse).
    assert _final_model(job.run_dir, pes, reuse=True)["tag"] == "seq_lbl_seed1"
    assert json.loads((job.run_dir / "metrics.jsonl").read_text())["val_loss"] == 7.5
    assert json.loads((job.run_dir / "summary.json").read_text())["restored_from"] == str(arc)
    # A second restore leaves the finished run alone; another PES sample size restores nothing.
    assert restore_runs(arc, jobs, pes)["seq_lbl_seed1"] == "already finished here"
    assert restore_runs(arc, jobs, pes + 1)["seq_lbl_seed1"].startswith("archived PES on")


def test_command_line_bad_archive_is_one_message(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([str(tmp_path / "nothing"), PRESET, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: archive") and "results.json" in err and "Traceback" not in err


def test_a_key_that_only_changes_what_is_measured_is_not_part_of_a_runs_identity(tmp_path: Path) -> None:
    """Runs saved when telemetry.timing defaulted to true (now None: on CPU only) are the same
    runs: they are restored and reused, not trained again (which would replace their results)."""
    out = tmp_path / "out"
    jobs, pes = _jobs(out)
    arc = _archive(tmp_path, jobs, pes)
    for job in jobs:
        if job.seed == 1:
            path = arc / "configs" / f"{job.key}.yaml"
            cfg = yaml.safe_load(path.read_text())
            assert cfg["telemetry"]["timing"] is None  # today's default
            cfg["telemetry"]["timing"] = True
            path.write_text(yaml.safe_dump(cfg))
    assert restore_runs(arc, jobs, pes)["seq_lbl_seed1"] == "restored"
    job = next(j for j in jobs if j.key == "seq_lbl_seed1")
    # a live run directory saved by the old code: reused as well
    saved = json.loads((job.run_dir / "config.json").read_text())
    saved["telemetry"]["timing"] = True
    (job.run_dir / "config.json").write_text(json.dumps(saved))
    assert run_state(job.run_dir, job.cfg) == "finished"
    # a key that changes the run still does
    saved["optim"]["lr"] = 1.0e-3
    (job.run_dir / "config.json").write_text(json.dumps(saved))
    assert run_state(job.run_dir, job.cfg) == "fresh"
