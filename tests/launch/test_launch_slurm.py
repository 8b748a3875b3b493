"""A real SLURM job: the shipped 2-node config, shrunk to this machine, trains on 2 ranks.

``slurm_cluster`` starts munged, slurmctld and slurmd from a config in a temp dir (Debian
packages slurmctld, slurmd, slurm-client, munge: installed by ``make setup-system``; missing
packages fail the test with what to install). ``moe-dist launch`` renders the sbatch script and
submits it; inside the job ``scontrol show hostnames`` finds the rendezvous host and ``srun``
starts one torchrun agent, which starts 2 workers.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import ROOT, launch_cmd, logged_losses, tiny_train
from rank_processes import free_port
from slurm_cluster import slurm_cluster

pytestmark = pytest.mark.slow


def job_state(job: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True, timeout=30
    )
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def test_sbatch_job_trains_on_single_node_slurm(tmp_path: Path) -> None:
    with slurm_cluster(tmp_path) as slurm_env:
        env = {**os.environ, **slurm_env}
        shrink = [
            "nodes=1",
            "procs_per_node=2",
            "devices=cpu",
            "container=null",
            "slurm.partition=null",
            "slurm.cpus_per_task=2",
            "slurm.exclusive=false",
            f"slurm.output={tmp_path}/job-%j.out",
            "telemetry.enabled=false",
            "telemetry.file_sd_path=null",
            f"rendezvous.port={free_port()}",
            f"launch_dir={tmp_path / 'launch'}",
            "env={OMP_NUM_THREADS: 1}",
        ]
        sets = [x for s in shrink for x in ("--set", s)]
        cluster = ROOT / "configs" / "cluster" / "slurm-2node-8gpu.yaml"
        cmd = launch_cmd(cluster, tiny_train(tmp_path, tmp_path / "runs"), *sets)
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().splitlines()[-1]
        assert job.isdigit(), out.stdout
        script = (tmp_path / "launch" / "moe-slurm" / "job.sbatch").read_text()
        assert "#SBATCH --nodes=1" in script and "--nproc-per-node 2" in script

        deadline = time.monotonic() + 240
        while (state := job_state(job, env)).get("JobState") not in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
        ):
            assert time.monotonic() < deadline, f"job {job} still {state.get('JobState')}"
            time.sleep(0.5)
        log = (tmp_path / f"job-{job}.out").read_text()
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert f"on 1 node(s), rendezvous at {host}:" in log
    assert "world 2 = DP 1 x EP 2" in log
    losses = logged_losses(tmp_path / "runs" / "tiny")
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
