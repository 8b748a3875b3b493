"""Real launches on this machine: every backend trains the tiny model on 2 ranks, and all agree.

The reference is ``backend: local`` (torchrun --standalone, 2 processes). Two torchrun agents
on loopback with a c10d rendezvous (``--nnodes 2 --nproc-per-node 1``) stand for two nodes;
mpirun and the DeepSpeed launcher start the same 2 ranks their own way. The losses in rank 0's
JSONL log must match the reference step for step.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from launch_helpers import kill_tree, launch_cmd, logged_losses, run_launch, tiny_train, write_cluster
from rank_processes import free_port

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("local")
    cluster = write_cluster(
        tmp, "local2", {"backend": "local", "procs_per_node": 2, "env": {"OMP_NUM_THREADS": 1}}
    )
    run_launch(cluster, tiny_train(tmp, tmp / "runs"), tmp)
    losses = logged_losses(tmp / "runs" / "tiny")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]  # it trained
    return losses


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_two_torchrun_agents_on_loopback_match_local(tmp_path: Path, reference: dict[int, float]) -> None:
    cluster = write_cluster(
        tmp_path,
        "two-nodes",
        {
            "backend": "torchrun",
            "nodes": 2,
            "procs_per_node": 1,
            "env": {"OMP_NUM_THREADS": 1},
            "rendezvous": {"endpoint": f"127.0.0.1:{free_port()}", "join_timeout_s": 60},
        },
    )
    train = tiny_train(tmp_path, tmp_path / "runs")
    agents = [
        subprocess.Popen(
            launch_cmd(cluster, train),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            kill_tree(a)
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "world 2" in "".join(outs)
    assert_same_losses(logged_losses(tmp_path / "runs" / "tiny"), reference)


def test_mpirun_two_ranks_match_local(tmp_path: Path, reference: dict[int, float]) -> None:
    cluster = write_cluster(
        tmp_path, "mpi", {"backend": "mpirun", "procs_per_node": 2, "env": {"OMP_NUM_THREADS": 1}}
    )
    out = run_launch(cluster, tiny_train(tmp_path, tmp_path / "runs"), tmp_path)
    assert "world 2" in out.stderr
    assert_same_losses(logged_losses(tmp_path / "runs" / "tiny"), reference)


def test_deepspeed_launcher_two_ranks_match_local(tmp_path: Path, reference: dict[int, float]) -> None:
    cluster = write_cluster(
        tmp_path, "ds", {"backend": "deepspeed", "procs_per_node": 2, "env": {"OMP_NUM_THREADS": 1}}
    )
    out = run_launch(cluster, tiny_train(tmp_path, tmp_path / "runs"), tmp_path)
    assert (tmp_path / "launch" / "ds" / "hostfile").read_text() == "localhost slots=2\n"
    assert "world 2" in out.stderr
    assert_same_losses(logged_losses(tmp_path / "runs" / "tiny"), reference)


def test_plain_mpirun_without_master_addr_trains_and_matches_local(
    tmp_path: Path, reference: dict[int, float]
) -> None:
    """``mpirun -np 2 moe-dist train ...`` with no MASTER_ADDR/PORT: mpi4py broadcasts rank 0's
    address and a free port (parallel/startup.py), and the run equals the torchrun one."""
    import os
    import shutil
    import sys

    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
    }
    cmd = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
    cmd += [
        "-x",
        "OMP_NUM_THREADS=1",
        sys.executable,
        "-m",
        "moe_dist.cli",
        *tiny_train(tmp_path, tmp_path / "runs"),
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2" in out.stderr + out.stdout
    assert_same_losses(logged_losses(tmp_path / "runs" / "tiny"), reference)
