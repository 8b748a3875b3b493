"""The config's rough edges: plugin sections resolved at any construction, an empty file refused,
shape errors at their field without the whole section dumped after them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli
from pydantic import ValidationError

from moe_dist.balancing.base import LossConfig
from moe_dist.config import (
    Config,
    ConfigError,
    MoEConfig,
    config_from_dict,
    config_to_dict,
    format_pydantic_errors,
    load_config,
    validate_moe,
)
from moe_dist.registry import LOSSES, ROUTERS
from moe_dist.routing.base import RouterConfig

LPR_MOE = {
    "num_experts": 4,
    "router": {"name": "lpr", "top_k": 2, "latent_dim": 8},
    "losses": [{"name": "switch", "coef": 0.02}, {"name": "seq_aux", "coef": 0.001}],
}


def plugin_types(moe: MoEConfig) -> list[type]:
    return [type(moe.router), *(type(x) for x in moe.losses)]


# ---------------------------------------------------------------- plugins resolved once, in the schema


@pytest.mark.parametrize(
    "build",
    [
        lambda: MoEConfig(**LPR_MOE),
        lambda: MoEConfig.model_validate(LPR_MOE),
        lambda: Config.model_validate({"model": {"dim": 16, "moe": LPR_MOE}}).model.moe,
        lambda: config_from_dict({"model": {"dim": 16, "moe": LPR_MOE}}).model.moe,
    ],
    ids=["kwargs", "MoEConfig.model_validate", "Config.model_validate", "config_from_dict"],
)
def test_every_construction_holds_the_plugins_config_objects(build) -> None:
    moe = build()
    expected = [ROUTERS.get("lpr").Config, LOSSES.get("switch").Config, LOSSES.get("seq_aux").Config]
    assert plugin_types(moe) == expected
    assert isinstance(moe.router, RouterConfig) and all(isinstance(x, LossConfig) for x in moe.losses)
    assert (moe.router.latent_dim, moe.losses[0].coef) == (8, 0.02)


def test_defaults_and_assignment_resolve_too() -> None:
    moe = MoEConfig()
    assert type(moe.router) is ROUTERS.get("topk_softmax").Config
    moe.router = {"name": "expert_choice", "capacity_factor": 1.5}
    assert type(moe.router) is ROUTERS.get("expert_choice").Config
    moe.router = RouterConfig(top_k=1)  # a base object becomes the plugin's class
    assert type(moe.router) is ROUTERS.get("topk_softmax").Config and moe.router.top_k == 1


def test_serialization_keeps_every_plugin_field() -> None:
    cfg = config_from_dict({"model": {"dim": 16, "moe": LPR_MOE}})
    dumped = cfg.model_dump(mode="json")
    router = dumped["model"]["moe"]["router"]
    assert router["latent_dim"] == 8 and set(ROUTERS.get("lpr").Config.model_fields) == set(router)
    assert config_to_dict(cfg) == dumped
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(dumped)))
    assert config_to_dict(again) == dumped
    assert plugin_types(again.model.moe) == plugin_types(cfg.model.moe)


def test_plugin_field_errors_carry_the_full_path() -> None:
    data = {
        "model": {
            "moe": {
                "router": {"name": "topk_softmax", "top_k": "two", "renormalise": True},
                "losses": [{"name": "switch", "coef": -1}, {"coef": 0.1}, 3],
            }
        }
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert err.value.errors == [
        "model.moe.router.top_k: Input should be a valid integer, unable to parse string as an integer, "
        "got 'two'",
        "model.moe.router.renormalise: unknown key (did you mean model.moe.router.renormalize?)",
        "model.moe.losses.0.coef: Input should be greater than or equal to 0, got -1",
        f"model.moe.losses.1.name: required (one of {', '.join(LOSSES.names())})",
        "model.moe.losses.2: each loss must be a mapping with a name and a coef, e.g. {name: switch, "
        "coef: 0.01}, got 3",
    ]
    with pytest.raises(ValidationError) as exc:
        MoEConfig(router="topk_softmax")
    assert format_pydantic_errors(exc.value, "moe") == [
        "moe.router: must be a mapping with at least a name, e.g. {name: topk_softmax, top_k: 2}, "
        "got 'topk_softmax'"
    ]


def test_validate_moe_checks_and_swaps_nothing() -> None:
    moe = MoEConfig(num_experts=4, router={"name": "topk_softmax", "top_k": 6}, losses=[{"name": "simbal"}])
    router, losses = moe.router, moe.losses
    assert validate_moe(moe, 16) == ["model.moe.router.top_k: must be <= num_experts (4), got 6"]
    assert moe.router is router and moe.losses is losses
    assert validate_moe(MoEConfig(**LPR_MOE), 16, prefix="moe") == []


def test_errors_are_listed_in_the_order_of_the_config() -> None:
    """Schema errors and whole-config checks interleave in field order, not in pass order."""
    data = {
        "run": {"bogus": 1},
        "model": {"moe": {"router": {"top_k": 12}, "losses": [{"name": "switch", "coef": "x"}]}},
        "parallel": {"ep_size": 3},
        "optim": {"lr": 0},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert [e.split(":")[0] for e in err.value.errors] == [
        "run.bogus",
        "model.moe.router.top_k",
        "model.moe.losses.0.coef",
        "parallel.ep_size",
        "optim.lr",
    ]


def test_a_broken_loss_still_lets_the_other_losses_be_checked() -> None:
    data = {
        "model": {
            "dim": 16,
            "moe": {
                "num_experts": 4,
                "router": {"name": "expert_choice"},
                "losses": [{"name": "switch", "coef": "x"}, {"name": "global_batch"}],
            },
        }
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert [e.split(":")[0] for e in err.value.errors] == [
        "model.moe.losses.0.coef",
        "model.moe.losses.1.name",
    ]
    assert "global_batch is constant with router 'expert_choice'" in err.value.errors[1]


# ---------------------------------------------------------------- shape errors at their field


@pytest.mark.parametrize(
    ("model", "line"),
    [
        ({"dim": 130, "n_heads": 4}, "model.dim: must be divisible by model.n_heads (4), got 130"),
        (
            {"dim": 12, "n_heads": 4},
            "model.dim: must be a multiple of 2 * model.n_heads (8): RoPE needs an even head dim, got 12",
        ),
        ({"n_layers": 2, "dense_layers": 3}, "model.dense_layers: must be <= model.n_layers (2), got 3"),
    ],
)
def test_model_shape_errors_name_the_field_and_only_it(model: dict, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": model})
    assert err.value.errors == [line]


def test_a_shape_error_does_not_hide_the_other_sections_errors() -> None:
    """model.dim's default fails against n_heads=3 too: the second pass then leaves out the
    model (and every check that reads it) but still checks the schedule."""
    data = {"model": {"n_heads": 3}, "parallel": {"ep_size": 3}, "schedule": {"warmup_steps": 1000}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert [e.split(":")[0] for e in err.value.errors] == ["model.dim", "schedule.warmup_steps"]


def test_the_cli_prints_the_shape_message_without_the_section() -> None:
    proc = run_cli("check", "configs/demo.yaml", "--set", "model.dim=130")
    assert proc.returncode == 2, proc.stderr
    assert "model.dim: must be divisible by model.n_heads (4), got 130" in proc.stderr
    assert "vocab_size" not in proc.stderr and "{" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- an empty file is refused


@pytest.mark.parametrize("text", ["", "# nothing set yet\n# model: {}\n", "{}\n", "null\n"])
@pytest.mark.parametrize("command", ["check", "train"])
def test_an_empty_config_file_is_refused(text: str, command: str, tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    proc = run_cli(command, str(path), "--set", f"run.out_dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path}:" in proc.stderr and "the file is empty" in proc.stderr, proc.stderr
    assert "use configs/demo.yaml as a start" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing trained


def test_no_file_means_the_defaults(tmp_path: Path) -> None:
    assert config_to_dict(load_config(None)) == config_to_dict(Config())
    (tmp_path / "x.yaml").write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="the file is empty") as err:
        load_config(tmp_path / "x.yaml", ["model.dim=64"])  # overrides alone are no config either
    assert err.value.source == str(tmp_path / "x.yaml")
