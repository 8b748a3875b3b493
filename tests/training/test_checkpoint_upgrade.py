"""A checkpoint written before the routing stage became one `Gate` (format version 1: the router's
keys were ``ffn.router.*``, under DeepSpeed ``gate.plugin.router.*``) resumes today, under each
engine, and continues its run exactly.

tests/assets/checkpoint_v1{,_deepspeed}/ are step 2 of a 4-step run of commit d6f470c (the last
version-1 code) on tests/assets/tiny.yaml with the overrides below; the ``.expected.json`` beside
each holds that run's losses.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from rank_processes import run_on_ranks
from train_helpers import tiny_data, train_body

from moe_dist.config import config_from_dict

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WRITTEN_WITH = (
    "parallel.ep_size=1",
    "run.device=cpu",
    "model.dim=16",
    "model.moe.experts.ffn_hidden_size=16",
    "schedule.steps=4",
    "schedule.warmup_steps=1",
    "checkpoint.every=2",
    "checkpoint.keep=2",
    "eval.every=0",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "asset"), [("native", "checkpoint_v1"), ("deepspeed", "checkpoint_v1_deepspeed")]
)
def test_a_version_1_checkpoint_resumes_and_continues_its_run(
    tmp_path: Path, engine: str, asset: str
) -> None:
    cfg = config_from_dict(tiny_data(tmp_path, *WRITTEN_WITH, "run.name=v1", f"parallel.engine={engine}"))
    root = tmp_path / "runs" / "v1" / "checkpoints"
    shutil.copytree(ASSETS / asset, root / "step_000002")
    (root / "latest").write_text("step_000002\n")
    expected = json.loads((ASSETS / f"{asset}.expected.json").read_text())

    out = run_on_ranks(train_body, 1, (cfg, ""))[0]

    assert "resumed from" in out["log"] and "at step 2" in out["log"], out["log"]
    assert sorted(out["losses"]) == [3, 4]
    for step, loss in out["losses"].items():
        assert math.isclose(loss, expected["losses"][str(step)], rel_tol=1e-5), (step, loss, expected)
    assert math.isclose(out["val"][4], expected["val_loss"], rel_tol=1e-5), (out["val"], expected)
