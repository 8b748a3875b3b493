"""``train --resume`` on a finished run says so and trains nothing (issue 28); with a longer
schedule the same command continues it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch_helpers import TINY
from train_helpers import write_corpus

from moe_dist.cli import main


def test_resume_on_a_finished_run_says_it_is_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_corpus(tmp_path)
    train = [
        "train",
        str(TINY),
        *("--set", f"data.paths=[{json.dumps(str(corpus))}]"),
        *("--set", f"run.out_dir={json.dumps(str(tmp_path / 'runs'))}"),
        *("--set", "parallel.ep_size=1", "--set", "schedule.steps=3", "--set", "checkpoint.every=3"),
    ]
    assert main(train) == 0
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    before = metrics.read_text()
    capsys.readouterr()
    assert main([*train, "--resume"]) == 0
    out = capsys.readouterr().err  # train's console
    assert "--resume: the run is finished:" in out and "step_000003 is at step 3 of schedule.steps 3" in out
    assert "--set schedule.steps=6" in out
    assert metrics.read_text() == before  # nothing trained, nothing logged
    assert main([*train, "--resume", "--set", "schedule.steps=4"]) == 0
    assert "at step 3" in capsys.readouterr().err  # "resumed from .../step_000003 at step 3"
    steps = [json.loads(x).get("step") for x in metrics.read_text().splitlines()]
    assert 4 in steps
