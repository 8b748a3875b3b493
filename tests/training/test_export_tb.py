"""``moe-dist export-tb``: finished runs' metrics.jsonl -> TensorBoard, one run per compare arm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rank_processes import run_on_ranks
from train_helpers import tiny_config, train_body

from moe_dist.cli import main
from moe_dist.training.loggers import record_histograms, record_scalars


def _accumulator(path: Path):  # noqa: ANN202 - tensorboard's EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export_tb")
    cfg = tiny_config(tmp, "parallel.ep_size=1", "run.name=done", "schedule.steps=4", "eval.every=2")
    run_on_ranks(train_body, 1, (cfg,))
    return cfg.run_dir


@pytest.mark.slow
def test_export_of_a_compare_dir_gives_one_run_per_arm_with_the_logged_tags(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    compare = tmp_path / "cmp"
    for arm in ("runs/switch", "runs/simbal/seed1", "runs/simbal/seed2"):
        (compare / arm).mkdir(parents=True)
        shutil.copy(finished_run / "metrics.jsonl", compare / arm / "metrics.jsonl")
    out = tmp_path / "tb"
    assert main(["export-tb", str(compare), "-o", str(out)]) == 0
    assert "runs/simbal/seed2: 4 records" in capsys.readouterr().out
    for arm in ("runs/switch", "runs/simbal/seed1", "runs/simbal/seed2"):
        acc = _accumulator(out / arm)
        want = {}
        for r in records:
            for tag, value in record_scalars(r).items():
                want.setdefault(tag, {})[r["step"]] = value
        assert set(acc.Tags()["scalars"]) == set(want)
        assert {"moe/layer_0/gini", "moe/layer_1/dropped_fraction", "val/loss"} <= set(want)
        for tag, by_step in want.items():
            assert {e.step: e.value for e in acc.Scalars(tag)} == pytest.approx(by_step, rel=1e-6), tag
        assert set(acc.Tags()["histograms"]) == set(record_histograms(records[0]))
    # a single run directory: one TensorBoard run named after it
    assert main(["export-tb", str(finished_run), "-o", str(tmp_path / "one")]) == 0
    assert set(_accumulator(tmp_path / "one" / "done").Tags()["scalars"]) == set(want)


def test_bad_input_is_one_message_exit_2_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tb"
    (tmp_path / "empty").mkdir()
    assert main(["export-tb", str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "no metrics.jsonl found" in capsys.readouterr().err
    assert main(["export-tb", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err
    good, bad = tmp_path / "cmp" / "a", tmp_path / "cmp" / "b"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    (good / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "aux": {}}\n')
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    assert main(["export-tb", str(tmp_path / "cmp"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:2: not a JSON line" in err
    assert not out.exists()  # the good arm was not written either
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    assert main(["export-tb", str(tmp_path / "cmp"), "-o", str(out)]) == 0
    assert main(["export-tb", str(tmp_path / "cmp"), "-o", str(out)]) == 2  # would duplicate events
    assert "already holds TensorBoard events" in capsys.readouterr().err
