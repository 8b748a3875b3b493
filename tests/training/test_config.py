"""Shipped configs validate; `moe-dist check` prints the resolved config; overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli

from moe_dist.config import config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
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
    assert (mixtral.num_experts, mixtral.router.top_k) == (8, 2)
    assert qwen.num_experts >= 64 and qwen.router.top_k == 8
    assert deepseek.model.moe.shared_experts.count == 1 and deepseek.model.dense_layers == 1
    assert deepseek.model.moe.router.name == "topk_sigmoid_bias"


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


def test_first_pass_errors_do_not_hide_plugin_and_cross_field_errors() -> None:
    """A type error elsewhere still lets the router, loss and EP checks report (all at once)."""
    from moe_dist.config import ConfigError

    data = {
        "model": {
            "dim": "abc",
            "moe": {
                "num_experts": 8,
                "router": {"name": "topk_softmax", "top_k": 12},
                "losses": [{"name": "switch", "coef": -1}],
            },
        },
        "parallel": {"ep_size": 3},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    paths = [line.split(":")[0] for line in err.value.errors]
    assert paths == ["model.dim", "model.moe.router.top_k", "model.moe.losses.0.coef", "parallel.ep_size"]


def test_a_dropped_value_never_causes_an_error_through_its_default() -> None:
    """Checks that read an invalid (dropped) value are left out rather than run on its default."""
    from moe_dist.config import ConfigError

    data = {
        "model": {"max_seq_len": 64, "moe": {"num_experts": "x", "router": {"top_k": 12}}},
        "parallel": {"ep_size": 3},
        "data": {"seq_len": "y"},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert [line.split(":")[0] for line in err.value.errors] == ["model.moe.num_experts", "data.seq_len"]
