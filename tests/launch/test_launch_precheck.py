"""``moe-dist launch`` refuses a fresh start on a run that has checkpoints before any rank starts:
one line, exit 2, no launcher started (and so no worker traceback), under every backend."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from launch_helpers import launch_cmd, tiny_train, write_cluster

import moe_dist.commands.launch as launch
from moe_dist.commands.launch import main

REFUSAL = "already has checkpoints (newest step_000004); continue it with --resume"
BACKENDS = {
    "local": {"backend": "local", "procs_per_node": 2},
    "torchrun": {"backend": "torchrun", "procs_per_node": 2},
    "deepspeed": {"backend": "deepspeed", "procs_per_node": 2},
    "mpirun": {"backend": "mpirun", "procs_per_node": 2},
    "slurm": {"backend": "slurm", "procs_per_node": 2},
}


def run_with_checkpoints(tmp: Path) -> Path:
    """An out_dir whose ``tiny`` run (tests/assets/tiny.yaml) saved a checkpoint at step 4."""
    out_dir = tmp / "runs"
    (out_dir / "tiny" / "checkpoints" / "step_000004").mkdir(parents=True)
    return out_dir


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every argument list the launch would run; nothing really starts."""
    calls: list[list[str]] = []

    def popen(argv: list[str], **_kw: object) -> None:
        calls.append(argv)
        raise AssertionError(f"the launch started {argv}")

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    return calls


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fresh_start_on_a_run_with_checkpoints_is_refused_before_launch(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], started: list[list[str]]
) -> None:
    cluster = write_cluster(tmp_path, backend, BACKENDS[backend])
    train = tiny_train(tmp_path, run_with_checkpoints(tmp_path))
    assert main([str(cluster), "--", *train]) == 2
    err = capsys.readouterr().err
    assert err.count(REFUSAL) == 1, err
    assert "Traceback" not in err
    assert started == []
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()


def test_resume_or_a_new_run_passes_the_precheck(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = str(write_cluster(tmp_path, "local", BACKENDS["local"]))
    out_dir = run_with_checkpoints(tmp_path)
    for more in (["--resume"], [f"--resume={out_dir / 'tiny' / 'checkpoints'}"], ["--set", "run.name=other"]):
        assert main([cluster, "--dry-run", "--", *tiny_train(tmp_path, out_dir, *more)]) == 0, more
    assert REFUSAL not in capsys.readouterr().err


def test_a_containers_run_dir_is_not_the_launchers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a container, out_dir is a path inside it: the launcher cannot judge, the ranks do."""
    cluster = write_cluster(tmp_path, "local", {**BACKENDS["local"], "container": {"image": "moe-dist:test"}})
    train = tiny_train(tmp_path, run_with_checkpoints(tmp_path))
    assert main([str(cluster), "--dry-run", "--", *train]) == 0, capsys.readouterr().err


def test_the_cli_prints_one_line_and_starts_no_worker(tmp_path: Path) -> None:
    """As a user runs it: without the precheck, torchrun would start two ranks and print their
    ChildFailedError traceback after our message."""
    cluster = write_cluster(tmp_path, "local", BACKENDS["local"])
    train = tiny_train(tmp_path, run_with_checkpoints(tmp_path))
    proc = subprocess.run(
        launch_cmd(cluster, train), capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count(REFUSAL) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()
