"""The two methods' ready model configs (issue 28): configs/models/qwen3_moe_tiny_lpr.yaml (LPR)
and mixtral_tiny_simbal.yaml (SimBal) validate as shipped, carry each paper's choices, and train
two steps on 2 gloo ranks with their own EP size; only the data and the run length are cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rank_processes import run_on_ranks
from train_helpers import train_body, write_corpus

from moe_dist.config import load_config
from moe_dist.config.advice import config_warnings

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "configs" / "models"


def test_method_configs_say_what_their_names_say() -> None:
    lpr = load_config(MODELS / "qwen3_moe_tiny_lpr.yaml")
    assert lpr.model.moe.router.name == "lpr" and lpr.model.moe.losses == []
    assert (lpr.model.moe.num_experts, lpr.model.moe.router.top_k) == (64, 8)
    simbal = load_config(MODELS / "mixtral_tiny_simbal.yaml")
    assert [x.name for x in simbal.model.moe.losses] == ["simbal", "z_loss"]
    assert simbal.model.moe.router.init == "orthogonal" and config_warnings(simbal) == []
    assert (simbal.model.moe.num_experts, simbal.model.moe.router.top_k) == (8, 2)


def _both(rank: int, world_size: int, cfgs: list) -> list[dict]:
    return [train_body(rank, world_size, cfg) for cfg in cfgs]  # one spawn of 2 ranks for both


@pytest.mark.slow
def test_method_configs_train_two_steps_on_two_ranks(tmp_path: Path) -> None:
    short = [
        f"run.out_dir={json.dumps(str(tmp_path / 'runs'))}",
        f"data.paths=[{json.dumps(str(write_corpus(tmp_path)))}]",
        "run.log_every=1",
        "run.threads=1",
        "schedule.steps=2",
        "schedule.warmup_steps=1",
        "data.seq_len=64",
        "data.micro_batch_size=2",
        "eval.every=0",
        "checkpoint.every=0",
    ]
    names = ["qwen3_moe_tiny_lpr", "mixtral_tiny_simbal"]
    cfgs = [load_config(MODELS / f"{name}.yaml", short, world_size=2) for name in names]
    assert [c.parallel.ep_size for c in cfgs] == [2, 2]  # as shipped
    rank0, _ = run_on_ranks(_both, 2, (cfgs,))
    for name, out in zip(names, rank0, strict=True):
        losses = out["losses"]
        assert len(losses) == 2 and all(x == x and 0 < x < 20 for x in losses), (name, out["log"][-2000:])
        assert out["skipped"] == [], name
