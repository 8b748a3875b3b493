"""`moe-dist launch` across the two test hosts (``two_hosts.TwoHosts``) and the one-host reference.

``STEPS`` steps of tests/assets/tiny.yaml; ``cross_host_cluster`` writes a cluster YAML naming the
hosts' addresses; ``launch_on_hosts`` starts the same launch on each host with its
``--node-rank`` (torchrun, deepspeed no_ssh) or on host 0 only (mpirun) and waits, failing with
every host's log on an error or a hang; ``one_host_losses`` is the same training run on this
machine with ``backend: local`` (computed once per session for each world size).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import launch_cmd, logged_losses, run_launch, tiny_train, write_cluster
from two_hosts import TwoHosts

STEPS = 20
ENV = {"OMP_NUM_THREADS": 1}
RDZV_PORT = 29400  # each host is a fresh namespace: every port is free
_reference: dict[int, dict[int, float]] = {}


def train_cmd(tmp: Path, out_dir: Path, *more: str) -> list[str]:
    """``train tiny.yaml`` for ``STEPS`` steps (2 warm-up steps as the launcher tests)."""
    return tiny_train(tmp, out_dir, "--set", f"schedule.steps={STEPS}", *more)


def cross_host_cluster(
    tmp: Path, name: str, hosts: TwoHosts, backend: str, procs_per_node: int, **extra: Any
) -> Path:
    data: dict[str, Any] = {
        "backend": backend,
        "nodes": 2,
        "procs_per_node": procs_per_node,
        "hosts": [h.addr for h in hosts.hosts],
        "env": ENV,
        "network": {"socket_ifname": hosts.ifname},
        "rendezvous": {"port": RDZV_PORT, "join_timeout_s": 60},
        **extra,
    }
    if backend == "deepspeed":
        data["deepspeed"] = {"no_ssh": True}
    if backend == "mpirun":  # OpenMPI reaches host 1 through the hosts' ssh stand-in
        data["mpirun"] = {"rsh_agent": str(hosts.rsh_agent(tmp / "rsh-agent")), "bind_to": "none"}
    return write_cluster(tmp, name, data)


def worker_ranks(hosts: TwoHosts, host: int) -> set[int]:
    """Global ranks of the training workers running in ``host`` now (from their environment)."""
    ranks = set()
    for pid in hosts.pids(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(
                v.decode().split("=", 1)
                for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if b"=" in v
            )
        except OSError:
            continue
        rank = env.get("RANK", env.get("OMPI_COMM_WORLD_RANK"))
        if b"moe_dist.cli" in cmdline and b"train" in cmdline and rank is not None:
            ranks.add(int(rank))
    return ranks


def wait_all(
    procs: list[subprocess.Popen], logs: list[Path], timeout_s: float, hosts: TwoHosts | None = None
) -> tuple[list[int], list[set[int]]]:
    """Exit codes of ``procs`` and the worker ranks seen in each host meanwhile; on a hang,
    fail with every log's tail (the fixture kills what is left)."""
    deadline = time.monotonic() + timeout_s
    seen: list[set[int]] = [set(), set()]
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            pytest.fail(f"launch still running after {timeout_s:.0f} s:\n{tails(logs)}")
        if hosts is not None:
            for i in range(2):
                seen[i] |= worker_ranks(hosts, i)
        time.sleep(0.2)
    return [p.returncode for p in procs], seen


def tails(logs: list[Path], chars: int = 3000) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in logs if log.exists())


def launch_on_hosts(
    hosts: TwoHosts,
    cluster: Path,
    train: list[str],
    tmp: Path,
    on: tuple[int, ...] = (0, 1),
    timeout_s: float = 150,
    tag: str = "",
) -> tuple[list[str], list[set[int]]]:
    """Run the launch on each host of ``on`` (``--node-rank`` = host index); all must exit 0.
    Returns the hosts' logs and the global ranks of the workers seen running in each host."""
    logs = [tmp / f"{cluster.stem}{tag}-host{i}.log" for i in on]
    procs = [
        hosts.popen(i, launch_cmd(cluster, train, f"--node-rank={i}"), log, cwd=tmp)
        for i, log in zip(on, logs, strict=True)
    ]
    codes, seen = wait_all(procs, logs, timeout_s, hosts)
    assert codes == [0] * len(on), f"exit codes {codes}:\n{tails(logs)}"
    return [log.read_text() for log in logs], seen


def one_host_losses(tmp_factory: pytest.TempPathFactory, procs: int) -> dict[int, float]:
    """The reference: the same run with ``backend: local`` and ``procs`` processes here."""
    if procs not in _reference:
        tmp = tmp_factory.mktemp(f"one_host_{procs}")
        cluster = write_cluster(tmp, "one-host", {"backend": "local", "procs_per_node": procs, "env": ENV})
        run_launch(cluster, train_cmd(tmp, tmp / "runs"), tmp)
        losses = logged_losses(tmp / "runs" / "tiny")
        assert sorted(losses) == list(range(1, STEPS + 1))
        _reference[procs] = losses
    return _reference[procs]


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    """Step for step, to the precision of the launcher and EP equivalence tests."""
    assert sorted(got) == sorted(want), f"steps {sorted(got)} != {sorted(want)}"
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def step_seconds(run_dir: Path) -> float:
    """Mean ``step_seconds`` of rank 0's log, the first step (warm-up) left out."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [r["step_seconds"] for r in recs if "step_seconds" in r and r.get("step", 0) > 1]
    return sum(times) / max(1, len(times))


def last_step(run_dir: Path) -> int:
    """The newest step in rank 0's metrics.jsonl (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x).get("step", 0) for x in lines if x.endswith("}")), default=0)


def wait_until(
    ok: Any, what: str, timeout_s: float, procs: list[subprocess.Popen], logs: list[Path]
) -> float:
    """Poll ``ok()`` until true (returns the seconds it took); fail if a launch ends or time runs out."""
    start = time.monotonic()
    while not ok():
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a launch ended before {what}:\n{tails(logs)}")
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"no {what} within {timeout_s:.0f} s:\n{tails(logs)}")
        time.sleep(0.05)
    return time.monotonic() - start
