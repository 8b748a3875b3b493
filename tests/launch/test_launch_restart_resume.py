"""Restarts that resume (issue 28): with ``max_restarts > 0``, ``moe-dist launch`` adds
``--resume`` to a ``train`` command that lacks it and says so once; a real torchrun restart after
a checkpoint then continues the run instead of refusing its own checkpoints. And the SLURM
``--dry-run`` writes the script where the shipped YAML's comment says."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import ROOT, descendants, kill_tree, launch_cmd, logged_losses, tiny_train, write_cluster

from moe_dist.commands.launch import main

NOTE = "added --resume to the train command"


def _train_line(out: str) -> list[str]:
    (line,) = [x for x in out.splitlines() if "moe_dist.cli" in x and " train " in x]
    return shlex.split(line)


def test_restarting_cluster_adds_resume_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_cluster(
        tmp_path, "elastic", {"backend": "torchrun", "procs_per_node": 2, "max_restarts": 3}
    )
    assert main([str(cluster), "--dry-run", "--", *tiny_train(tmp_path, tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert _train_line(out).count("--resume") == 1
    assert err.count(NOTE) == 1, err
    # the user's own --resume stays alone, and no note
    assert main([str(cluster), "--dry-run", "--", *tiny_train(tmp_path, tmp_path / "runs", "--resume")]) == 0
    out, err = capsys.readouterr()
    assert _train_line(out).count("--resume") == 1 and NOTE not in err
    # no restarts: nothing added
    plain = write_cluster(tmp_path, "plain", {"backend": "torchrun", "procs_per_node": 2})
    assert main([str(plain), "--dry-run", "--", *tiny_train(tmp_path, tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert "--resume" not in _train_line(out) and NOTE not in err


def test_added_resume_does_not_let_a_first_start_overwrite_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal of a fresh start on a run with checkpoints judges the user's own arguments."""
    (tmp_path / "runs" / "tiny" / "checkpoints" / "step_000004").mkdir(parents=True)
    cluster = write_cluster(tmp_path, "elastic", {"backend": "local", "procs_per_node": 2, "max_restarts": 1})
    assert main([str(cluster), "--dry-run", "--", *tiny_train(tmp_path, tmp_path / "runs")]) == 2
    assert "already has checkpoints" in capsys.readouterr().err


def test_slurm_dry_run_writes_the_script_the_yaml_comment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = ROOT / "configs" / "cluster" / "slurm-2node-8gpu.yaml"
    named = re.search(r"Renders (\S+)", shipped.read_text()).group(1)
    monkeypatch.chdir(tmp_path)
    assert main([str(shipped), "--dry-run", "--", "train", "configs/demo.yaml"]) == 0
    out = capsys.readouterr().out
    script = tmp_path / named
    assert script.is_file(), (named, sorted(str(p) for p in tmp_path.rglob("*")))
    assert f"# wrote {script}; submit it with: sbatch {script}" in out
    body = script.read_text()
    assert body.startswith("#!") and body.rstrip("\n") in out
    assert "#SBATCH --nodes=2" in body and "--resume" in body  # max_restarts: 2 in the shipped YAML


def _worker(launcher_pid: int) -> int | None:
    """The first attempt's worker below our launch (TORCHELASTIC_RESTART_COUNT=0)."""
    for pid in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=0" in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return pid
    return None


@pytest.mark.slow
def test_a_restart_after_a_checkpoint_continues_the_run(tmp_path: Path) -> None:
    """One worker, ``max_restarts: 1``, no ``--resume`` typed: we SIGKILL the worker once a
    checkpoint exists; torchrun restarts it and the run resumes and finishes. Without the added
    ``--resume`` the restart refuses the checkpoint and the launch fails."""
    steps, every = 30, 5
    cluster = write_cluster(
        tmp_path,
        "elastic",
        {"backend": "local", "procs_per_node": 1, "max_restarts": 1, "env": {"OMP_NUM_THREADS": 1}},
    )
    more = [
        "--set",
        "parallel.ep_size=1",
        "--set",
        f"schedule.steps={steps}",
        "--set",
        f"checkpoint.every={every}",
    ]
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            launch_cmd(cluster, tiny_train(tmp_path, tmp_path / "runs", *more)),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            ckpt = tmp_path / "runs" / "tiny" / "checkpoints"
            deadline = time.monotonic() + 120
            while not (ckpt / "latest").is_file():
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint was written"
                time.sleep(0.02)
            victim = _worker(proc.pid)
            assert victim is not None, "the worker is not among the launch's descendants"
            os.kill(victim, signal.SIGKILL)
            code = proc.wait(timeout=120)
        finally:
            kill_tree(proc)
    output = log_path.read_text()
    assert code == 0, output[-4000:]
    assert output.count(NOTE) == 1
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", output)]
    assert len(resumed) == 1 and resumed[0] >= every and resumed[0] % every == 0, output[-4000:]
    assert sorted(logged_losses(tmp_path / "runs" / "tiny")) == list(range(1, steps + 1))
