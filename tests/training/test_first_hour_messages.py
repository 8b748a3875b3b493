"""The messages of a user's first hour (issue 28), each through the real CLI or loader:

- ``check`` names what one process of ``train`` would refuse, and which world size it assumed;
- the ``ep_size`` / world-size error comes with the config's own errors, all at once, in
  ``check --world-size`` and in ``train`` itself;
- ``router.name: simbal`` says that SimBal is a balancing loss; SimBal without an orthogonal
  router init is a warning in ``check`` and in ``train``;
- a close typo gets "did you mean" (config and cluster YAML);
- ``check --help`` describes the command.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from moe_dist.cli import main
from moe_dist.config import ConfigError, load_config
from moe_dist.config.advice import config_warnings
from moe_dist.launcher.cluster_loading import load_cluster_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
EP_ONE_PROCESS = "parallel.ep_size: must divide the world size (1), got 2"
WARMUP = "schedule.warmup_steps: must be <= schedule.steps (10)"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``moe-dist ARGS`` in this process (as the console script calls ``main``), output captured."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            code = main(list(args))
        except SystemExit as exc:  # --help
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def test_check_names_what_one_process_refuses_and_the_world_size_it_assumed(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    done = cli("check", DEMO)
    assert done.returncode == 0, done.stderr
    tail = done.stdout.splitlines()[-2:]
    assert tail[0].startswith(
        "# one process (`moe-dist train` without a launcher) is refused: " + EP_ONE_PROCESS
    )
    assert tail[1].startswith(f"# {DEMO}: OK for 2 process(es) (assumed: the fewest")
    ok = cli("check", DEMO, "--set", "parallel.ep_size=1")
    assert "is refused" not in ok.stdout and f"# {DEMO}: OK for 1 process(es)" in ok.stdout


def test_world_size_error_comes_with_the_others() -> None:
    sets = ["schedule.steps=10", "schedule.warmup_steps=20"]
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, sets, world_size=1)
    assert len(info.value.errors) == 2
    assert info.value.errors[0].startswith(EP_ONE_PROCESS) and info.value.errors[1] == WARMUP
    # also when the schema itself fails (the second pass), and a dropped key's neighbour stays
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [*sets, "schedule.step=3"], world_size=1)
    assert any(e.startswith(EP_ONE_PROCESS) for e in info.value.errors)
    assert WARMUP in info.value.errors, info.value.errors


@pytest.mark.parametrize("command", ["check", "train"])
def test_cli_reports_both_errors_in_one_message(
    command: str, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    extra = ["--world-size", "1"] if command == "check" else []
    done = cli(command, DEMO, "--set", "schedule.steps=10", "--set", "schedule.warmup_steps=20", *extra)
    assert done.returncode == 2
    assert EP_ONE_PROCESS in done.stderr and WARMUP in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_simbal_as_a_router_points_to_the_losses() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["model.moe.router.name=simbal"])
    (line,) = info.value.errors
    assert line.startswith("model.moe.router.name: unknown router 'simbal'")
    assert "'simbal' is a balancing loss: list it under model.moe.losses" in line
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["model.moe.losses=[{name: lpr}]"])
    assert "'lpr' is a router: set model.moe.router.name=lpr" in info.value.errors[0]


def test_simbal_without_orthogonal_init_warns_once_in_check_and_train(
    tmp_path: Path, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    simbal = ["--set", "model.moe.losses=[{name: simbal, coef: 0.1}]", "--set", "parallel.ep_size=1"]
    warning = "model.moe.losses.0: simbal runs without an orthogonal router init (init is normal)"
    checked = cli("check", DEMO, *simbal)
    assert checked.returncode == 0 and checked.stdout.count(warning) == 1, checked.stdout[-1500:]
    orthogonal = load_config(DEMO, [s for s in simbal if s != "--set"] + ["model.moe.router.init=orthogonal"])
    assert config_warnings(orthogonal) == []
    # train says it before it starts (here it then stops at an unreadable data path: no training needed)
    trained = cli("train", DEMO, *simbal, "--set", f"data.paths=[{tmp_path / 'missing.txt'}]")
    assert trained.returncode == 2 and trained.stderr.count(warning) == 1, trained.stderr


def test_close_typo_gets_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["schedule.step=3", "model.moe.router.top_kk=1", "run.zzz=1"])
    assert info.value.errors == [
        "run.zzz: unknown key",
        "model.moe.router.top_kk: unknown key (did you mean model.moe.router.top_k?)",
        "schedule.step: unknown key (did you mean schedule.steps?)",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["model.moe.losses.0.coeff=0.1"])
    assert info.value.errors == [
        "model.moe.losses.0.coeff: unknown key (did you mean model.moe.losses.0.coef?)"
    ]
    cluster = tmp_path / "c.yaml"
    cluster.write_text("backend: slurm\nslurm: {partiton: gpu}\n")
    with pytest.raises(ConfigError) as info:
        load_cluster_config(cluster)
    assert "slurm.partiton: unknown key (did you mean slurm.partition?)" in info.value.errors


def test_check_help_has_a_description(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    done = cli("check", "--help")
    assert done.returncode == 0
    assert "Validate CONFIG" in done.stdout and "--world-size" in done.stdout
