"""Checkpoints: kill-and-resume is exact, a corrupt newest checkpoint falls back, EP resharding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rank_processes import run_on_ranks
from train_helpers import tiny_config, train_body

from moe_dist.training import checkpoint_choice


@pytest.mark.slow
def test_kill_and_resume_is_exact_and_corrupt_newest_falls_back(tmp_path: Path) -> None:
    full = run_on_ranks(train_body, 2, (tiny_config(tmp_path, "parallel.ep_size=2", "checkpoint.every=8"),))[
        0
    ]
    # the same run (other name), stopped after step 16 as if killed: checkpoints 8 and 16 exist
    cfg = tiny_config(tmp_path, "parallel.ep_size=2", "checkpoint.every=8", "run.name=killed")
    run_on_ranks(train_body, 2, (cfg, None, 16))
    root = tmp_path / "runs" / "killed" / "checkpoints"
    assert [p.name for p in checkpoint_choice.list_checkpoints(root)] == ["step_000008", "step_000016"]
    assert (root / "latest").read_text().strip() == "step_000016"
    shutil.copytree(tmp_path / "runs" / "killed", tmp_path / "runs" / "copy")

    resumed = run_on_ranks(train_body, 2, (cfg, ""))[0]  # --resume: latest
    assert "resumed from" in resumed["log"] and "step_000016" in resumed["log"]
    assert sorted(resumed["losses"]) == list(range(17, 25))
    for step, loss in resumed["losses"].items():
        assert loss == full["losses"][step], step  # exact: same weights, moments, batches, RNG
    assert resumed["val"][24] == full["val"][24]
    assert resumed["counts"] == full["counts"]  # the whole-run expert counts are resumed too

    # truncate the newest checkpoint of the copy: reported in one line, step 8 is used instead
    model_pt = tmp_path / "runs" / "copy" / "checkpoints" / "step_000016" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:1000])
    fallback = run_on_ranks(train_body, 2, (cfg, str(tmp_path / "runs" / "copy" / "checkpoints")))[0]
    assert "step_000016 is unusable: model.pt has 1000 bytes" in fallback["log"]
    assert sorted(fallback["losses"]) == list(range(9, 25))
    for step, loss in fallback["losses"].items():
        assert loss == full["losses"][step], step


@pytest.mark.slow
def test_ep2_checkpoint_resumes_at_ep1_and_ep4(tmp_path: Path) -> None:
    """An EP=2 checkpoint (experts and their AdamW moments stored in the global layout):

    - at EP=1 on 1 process and at EP=4 on 4 processes it gives the same validation loss;
    - at EP=1 (DP=2) on the same 2 ranks, training continues with the same losses as the
      uninterrupted EP=2 run (same batches; expert moments resliced correctly).
    """
    base = tiny_config(
        tmp_path, "parallel.ep_size=2", "schedule.steps=16", "checkpoint.every=8", "eval.every=8"
    )
    ep2 = run_on_ranks(train_body, 2, (base,))[0]
    step8 = str(tmp_path / "runs" / "t" / "checkpoints" / "step_000008")

    def at(ep: int, name: str, steps: int):  # noqa: ANN202
        return tiny_config(tmp_path, f"parallel.ep_size={ep}", f"schedule.steps={steps}", f"run.name={name}")

    # nothing left to train at steps=8: these runs load and evaluate
    ep1 = train_body(0, 1, at(1, "ep1", 8), step8)
    ep4 = run_on_ranks(train_body, 4, (at(4, "ep4", 8), step8))[0]
    assert ep1["losses"] == {} and ep4["losses"] == {}
    assert ep1["val"][8] == pytest.approx(ep2["val"][8], rel=1e-5)
    assert ep4["val"][8] == pytest.approx(ep2["val"][8], rel=1e-5)

    dp2 = run_on_ranks(train_body, 2, (at(1, "dp2", 16), step8))[0]
    assert sorted(dp2["losses"]) == list(range(9, 17))
    for step, loss in dp2["losses"].items():
        assert loss == pytest.approx(ep2["losses"][step], rel=1e-5), step


def test_verify_reports_missing_and_corrupt_files(tmp_path: Path) -> None:
    assert checkpoint_choice.verify(tmp_path) is not None  # no meta.json
    assert checkpoint_choice.candidates(tmp_path / "nothing") == []


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(tmp_path: Path) -> None:
    import json

    step = tmp_path / "step_000004"
    step.mkdir()
    meta = {"format": checkpoint_choice.FORMAT, "engine": "deepspeed", "step": 4, "files": {}}
    (step / "meta.json").write_text(json.dumps(meta))
    assert checkpoint_choice.read_meta(step, "deepspeed")["step"] == 4
    with pytest.raises(checkpoint_choice.CheckpointError, match="written by parallel.engine deepspeed"):
        checkpoint_choice.read_meta(step, "native")
    del meta["engine"]  # checkpoints from before the field: the native trainer's
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint_choice.CheckpointError, match="written by parallel.engine native"):
        checkpoint_choice.read_meta(step, "deepspeed")
