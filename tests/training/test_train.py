"""Training end to end on real gloo processes, and the launch-environment mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rank_processes import run_on_ranks
from train_helpers import tiny_config, train_body

from moe_dist.parallel.startup import LaunchEnvError, launch_info


@pytest.mark.slow
def test_loss_falls_and_ep2_equals_ep1_dp2(tmp_path: Path) -> None:
    """World 2: EP=1 (DP=2) and EP=2 read the same batches (data rank = global rank), start from
    the same weights (experts drawn in global order) and reduce gradients to the same mean, so
    their loss curves agree to float round-off."""
    dp = run_on_ranks(train_body, 2, (tiny_config(tmp_path, "parallel.ep_size=1", "run.name=dp"),))
    ep = run_on_ranks(train_body, 2, (tiny_config(tmp_path, "parallel.ep_size=2", "run.name=ep"),))
    a, b = dp[0]["losses"], ep[0]["losses"]
    assert dp[0]["losses"] == dp[1]["losses"] and ep[0]["losses"] == ep[1]["losses"]  # ranks agree
    assert sorted(a) == list(range(1, 25))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    first, last = sum(a[s] for s in (1, 2, 3)) / 3, sum(a[s] for s in (22, 23, 24)) / 3
    assert last < first - 1.0, (first, last)
    assert abs(dp[0]["val"][24] - ep[0]["val"][24]) < 1e-5
    # expert counts over the run: every token-slot counted once (2 ranks x 24 steps x 4 x 32 x top-2)
    assert sum(ep[0]["counts"][0]) == 2 * 24 * 4 * 32 * 2
    # the metrics log has one line per step, with per-layer load statistics
    lines = [json.loads(x) for x in (tmp_path / "runs" / "ep" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 25))
    assert lines[-1]["val_loss"] == pytest.approx(ep[0]["val"][24])
    assert {"loss", "lr", "tokens", "tokens_per_s", "step_seconds", "aux", "layers"} <= set(lines[0])
    assert set(lines[0]["aux"]) == {"switch"} and "gini" in lines[0]["layers"][0]


@pytest.mark.slow
def test_non_finite_steps_are_skipped_on_every_rank(tmp_path: Path) -> None:
    """A diverging run (absurd learning rate) produces non-finite losses; all ranks skip the same
    steps and say so, instead of writing NaN into the weights and crashing."""
    cfg = tiny_config(
        tmp_path,
        "parallel.ep_size=2",
        "optim.lr=1.0e30",
        "optim.grad_clip=0.0",
        "schedule.steps=6",
        "schedule.warmup_steps=0",
    )
    out = run_on_ranks(train_body, 2, (cfg,))
    assert out[0]["skipped"] and out[0]["skipped"] == out[1]["skipped"]
    assert "step skipped" in out[0]["log"]


def test_launch_info_maps_torchrun_mpi_and_slurm() -> None:
    assert launch_info({}).launcher == "single"
    torchrun = launch_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "OMPI_COMM_WORLD_RANK": "0"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (
        3,
        4,
        1,
        "torchrun",
    )
    mpi = launch_info(
        {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    )
    assert (mpi.rank, mpi.world_size, mpi.local_rank, mpi.launcher) == (2, 8, 2, "mpirun")
    slurm = launch_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.launcher) == (5, 6, 1, "slurm")
    with pytest.raises(LaunchEnvError, match="SLURM_PROCID=7 outside SLURM_NTASKS=6"):
        launch_info({"SLURM_PROCID": "7", "SLURM_NTASKS": "6"})


_INIT_SCRIPT = """
import torch, torch.distributed as dist
from moe_dist.config import ParallelConfig
from moe_dist.parallel.startup import init_distributed, shutdown_distributed
info = init_distributed(ParallelConfig(timeout_s=60))
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(info.launcher, info.rank, info.world_size, info.local_rank, dist.get_backend(), float(t[0]))
shutdown_distributed()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "names"),
    [
        ("mpirun", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")),
        ("slurm", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")),
    ],
)
def test_init_distributed_from_mpi_and_slurm_variables(launcher: str, names: tuple[str, str, str]) -> None:
    """Two real processes with only the launcher's variables (no RANK) form a gloo group."""
    import os
    import subprocess
    import sys

    from rank_processes import free_port

    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _INIT_SCRIPT],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **base,
                names[0]: str(r),
                names[1]: "2",
                names[2]: str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (out, err) in enumerate(outs):
        assert procs[r].returncode == 0, err
        assert out.split() == [launcher, str(r), "2", str(r), "gloo", "3.0"]
