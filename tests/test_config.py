"""Shipped configs validate; `moe-dist check` prints the resolved config; overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli

from moe_dist.config import config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([ROOT / "configs" / "demo.yaml", *(ROOT / "configs" / "models").glob("*.yaml")])


def test_the_model_configs_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"demo", "mixtral_tiny", "qwen3_moe_tiny", "deepseek_v3_tiny"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_validate_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    again = config_from_dict(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert cfg.model.moe.num_experts % cfg.parallel.ep_size == 0


def test_model_shapes_are_what_their_names_say() -> None:
    mixtral = load_config(ROOT / "configs/models/mixtral_tiny.yaml").model.moe
    qwen = load_config(ROOT / "configs/models/qwen3_moe_tiny.yaml").model.moe
    deepseek = load_config(ROOT / "configs/models/deepseek_v3_tiny.yaml")
    assert (mixtral.num_experts, mixtral.router_cfg.top_k) == (8, 2)
    assert qwen.num_experts >= 64 and qwen.router_cfg.top_k == 8
    assert deepseek.model.moe.shared_experts.count == 1 and deepseek.model.dense_layers == 1
    assert deepseek.model.moe.router_cfg.name == "topk_sigmoid_bias"


def test_check_cli_prints_the_resolved_config_with_overrides() -> None:
    proc = run_cli(
        "check",
        "configs/demo.yaml",
        "--set",
        "model.moe.num_experts=16",
        "--set",
        "model.moe.router.top_k=4",
        timeout=None,
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["model"]["moe"]["num_experts"] == 16
    assert resolved["model"]["moe"]["router"]["top_k"] == 4
    assert resolved["model"]["moe"]["router"]["renormalize"] is True  # plugin defaults filled in
    assert resolved["optim"]["betas"] == [0.9, 0.95]
