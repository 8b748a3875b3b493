"""Network faults between two real hosts (``two_hosts.TwoHosts``): each ends cleanly, and resumes.

torchrun on both hosts, EP=2 with one process per host (every all-to-all crosses the link),
``checkpoint.every`` 5, ``train --resume``, short timeouts. The losses after a resume must equal
the uninterrupted one-host run step for step.

- A node dies (every process of host 1 SIGKILLed): host 0's rank says at once which peer it lost
  (its kernel resets the sockets); host 0's agent waits for the node (``max_restarts: 1``); the
  same launch on host 1 rejoins, the group restarts from the last checkpoint and finishes.
- A partition (host 1's link down for longer than ``parallel.timeout_s``): no reset comes; both
  ranks end on the collective timeout with one line each, host 0's launch right after, host 1's
  once its rendezvous host has not answered for ``rendezvous.read_timeout_s`` (torch's agent
  would wait for the kernel's TCP retries, ~15 min: ``launcher/agent_watch.py``). With the link
  back, the same launch with ``--resume`` finishes.
- A slow network (20 ms delay and 1% loss on host 1's frames): the same losses, slower steps.
- A wrong ``socket_ifname`` or an unreachable rendezvous host: one clear error before anything
  starts, within ``rendezvous.read_timeout_s``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from launch_helpers import launch_cmd, logged_losses
from multihost_launch import (
    assert_same_losses,
    cross_host_cluster,
    last_step,
    launch_on_hosts,
    one_host_losses,
    step_seconds,
    tails,
    train_cmd,
    wait_until,
)
from two_hosts import TwoHosts, no_leftovers, two_hosts  # noqa: F401 - fixtures

from moe_dist.parallel.lost_peer import lost_peer_message
from moe_dist.parallel.startup import LaunchEnvError, check_socket_ifname

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]
EVERY, FAULT_AT = 5, 7  # checkpoint every 5 steps; the fault strikes at step 7 or later
TIMEOUT_S, READ_TIMEOUT_S = 15, 5  # parallel.timeout_s, rendezvous.read_timeout_s
STOP_S = 20  # torchrun's time to stop after its worker failed (measured 3-9 s on a busy 2-core machine)


def fault_run(tmp: Path, hosts: TwoHosts, name: str, **cluster: object) -> tuple[Path, list[str]]:
    path = cross_host_cluster(
        tmp,
        name,
        hosts,
        "torchrun",
        1,
        rendezvous={"port": 29400, "join_timeout_s": 60, "read_timeout_s": READ_TIMEOUT_S},
        **cluster,
    )
    more = ["--set", f"checkpoint.every={EVERY}", "--set", f"parallel.timeout_s={TIMEOUT_S}", "--resume"]
    return path, train_cmd(tmp, tmp / "runs", *more)


def start_both_until_fault(
    hosts: TwoHosts, cluster: Path, train: list[str], tmp: Path
) -> tuple[Path, list[Path], list[subprocess.Popen]]:
    """Launch on both hosts and wait until training passed ``FAULT_AT``: (run dir, logs, launches)."""
    runs = tmp / "runs" / "tiny"
    logs = [tmp / f"host{i}.log" for i in (0, 1)]
    procs = [hosts.popen(i, launch_cmd(cluster, train, f"--node-rank={i}"), logs[i], cwd=tmp) for i in (0, 1)]
    wait_until(lambda: last_step(runs) >= FAULT_AT, f"step {FAULT_AT}", 180, procs, logs)
    return runs, logs, procs


def resumed_step(log: str) -> int:
    found = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(found) == 1, log[-3000:]
    return found[0]


def test_node_dies_host0_names_it_then_the_node_rejoins_and_the_run_resumes(
    two_hosts: TwoHosts,  # noqa: F811
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cluster, train = fault_run(tmp_path, two_hosts, "elastic", max_restarts=1)
    runs, logs, procs = start_both_until_fault(two_hosts, cluster, train, tmp_path)
    killed_at, kill = last_step(runs), time.monotonic()
    assert two_hosts.kill_host(1) >= 3  # the launch, torchrun's agent, the worker
    peer = two_hosts.hosts[1].addr
    wait_until(lambda: f"lost its peer {peer}" in logs[0].read_text(), "lost-peer line", 60, procs[:1], logs)
    took = time.monotonic() - kill
    assert took < 10, f"host 0 named its lost peer only after {took:.1f} s"
    print(f"node dies: host 0 named its lost peer {took:.1f} s after the kill")
    (line,) = [x for x in logs[0].read_text().splitlines() if "lost its peer" in x]
    assert line.startswith(f"error: rank 0 on node0 lost its peer {peer} (connection "), line
    # host 0's agent waits for the node (max_restarts 1); it comes back with the same launch
    procs.append(
        two_hosts.popen(
            1, launch_cmd(cluster, train, "--node-rank=1"), tmp_path / "host1-again.log", cwd=tmp_path
        )
    )
    codes = [procs[0].wait(timeout=180), procs[2].wait(timeout=60)]
    assert codes == [0, 0], tails([logs[0], tmp_path / "host1-again.log"])
    start = resumed_step(logs[0].read_text())
    assert start % EVERY == 0 and EVERY <= start <= killed_at
    assert_same_losses(logged_losses(runs), one_host_losses(tmp_path_factory, 2))


def test_partition_ends_both_sides_within_the_timeout_then_resumes(
    two_hosts: TwoHosts,  # noqa: F811
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cluster, train = fault_run(tmp_path, two_hosts, "partition")
    runs, logs, procs = start_both_until_fault(two_hosts, cluster, train, tmp_path)
    two_hosts.set_link(1, up=False)
    cut, ended = time.monotonic(), [0.0, 0.0]
    while any(p.poll() is None for p in procs) and time.monotonic() - cut < TIMEOUT_S + READ_TIMEOUT_S + 60:
        for i, p in enumerate(procs):
            if p.poll() is not None and not ended[i]:
                ended[i] = time.monotonic() - cut
        time.sleep(0.1)
    assert all(p.poll() is not None for p in procs), f"a side still runs:\n{tails(logs)}"
    ended = [e or time.monotonic() - cut for e in ended]  # the last one ended in the last poll
    assert [p.returncode for p in procs] == [1, 1]
    for i, log in enumerate(logs):
        text = log.read_text()
        assert f"error: rank {i} on node{i}: a collective got no answer within {TIMEOUT_S} s" in text, text[
            -3000:
        ]
    assert ended[0] <= TIMEOUT_S + STOP_S, f"host 0 ended {ended[0]:.1f} s after the cut"
    assert ended[1] <= TIMEOUT_S + READ_TIMEOUT_S + STOP_S, f"host 1 ended {ended[1]:.1f} s after the cut"
    assert "has not answered for" in logs[1].read_text()  # the agent watch stopped host 1's agent
    print(f"partition: host 0 ended {ended[0]:.1f} s, host 1 {ended[1]:.1f} s after the cut")
    # the link returns; the same launch resumes from the last checkpoint
    two_hosts.set_link(1, up=True)
    outs, _ = launch_on_hosts(two_hosts, cluster, train, tmp_path, tag="-resume")
    assert resumed_step(outs[0]) == EVERY
    assert_same_losses(logged_losses(runs), one_host_losses(tmp_path_factory, 2))


def test_slow_lossy_link_keeps_the_losses(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """netem's ``delay 20ms loss 1%`` on host 1's frames (a user-space link: ``link_relay.py``)."""
    with TwoHosts(delay_ms=20, loss=0.01) as hosts:
        cluster = cross_host_cluster(tmp_path, "slow", hosts, "torchrun", 1)
        launch_on_hosts(hosts, cluster, train_cmd(tmp_path, tmp_path / "runs"), tmp_path, timeout_s=240)
    assert_same_losses(logged_losses(tmp_path / "runs" / "tiny"), one_host_losses(tmp_path_factory, 2))
    print(f"slow link: {step_seconds(tmp_path / 'runs' / 'tiny'):.3f} s per step")


def test_wrong_socket_ifname_is_one_clear_error(two_hosts: TwoHosts, tmp_path: Path) -> None:  # noqa: F811
    cluster = cross_host_cluster(
        tmp_path, "ifname", two_hosts, "torchrun", 1, network={"socket_ifname": "eth9"}
    )
    start = time.monotonic()
    out = two_hosts.run(
        1, launch_cmd(cluster, train_cmd(tmp_path, tmp_path / "runs"), "--node-rank=1"), cwd=tmp_path
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == "" and out.stderr.splitlines()[1:] == [
        "  network.socket_ifname: this node (node1) has no interface 'eth9'; its interfaces: lo, mdnet0"
    ], out.stderr
    assert time.monotonic() - start < 30
    # the workers check too (mpirun starts them on hosts whose launch never ran)
    with pytest.raises(
        LaunchEnvError, match=r"GLOO_SOCKET_IFNAME=eth9 names 'eth9', which this host .* does not have"
    ):
        check_socket_ifname({"GLOO_SOCKET_IFNAME": "eth9"})


def test_unreachable_rendezvous_host_is_one_clear_error(two_hosts: TwoHosts, tmp_path: Path) -> None:  # noqa: F811
    nobody = str(two_hosts.subnet[9])  # on the hosts' network, but no host has it
    cluster = cross_host_cluster(
        tmp_path,
        "unreachable",
        two_hosts,
        "torchrun",
        1,
        rendezvous={"endpoint": f"{nobody}:29400", "read_timeout_s": READ_TIMEOUT_S},
    )
    start = time.monotonic()
    out = two_hosts.run(
        1, launch_cmd(cluster, train_cmd(tmp_path, tmp_path / "runs"), "--node-rank=1"), cwd=tmp_path
    )
    took = time.monotonic() - start
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.splitlines()[1:]
    want = (
        f"  rendezvous.endpoint: from node1, the rendezvous host {nobody}:29400 is not reachable within "
        f"{READ_TIMEOUT_S} s (rendezvous.read_timeout_s): "
    )
    assert line in (want + "No route to host", want + "no answer"), out.stderr  # ARP gave up, or not yet
    assert READ_TIMEOUT_S <= took < READ_TIMEOUT_S + 30


def _group_timeouts(rank: int, port: int, queue: object) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch
    import torch.distributed as dist

    from moe_dist.config import ParallelConfig
    from moe_dist.parallel.groups import ParallelGroups
    from moe_dist.parallel.startup import init_distributed

    init_distributed(ParallelConfig(timeout_s=7, backend="gloo"))
    groups = ParallelGroups.build(2, "collective")
    found = [
        g._get_backend(torch.device("cpu")).options._timeout
        for g in (groups.world_group, groups.ep_group, groups.expert_dp_group)
    ]
    queue.put(found)  # type: ignore[attr-defined]
    dist.destroy_process_group()


def test_every_process_group_takes_parallel_timeout_s() -> None:
    """The EP and expert-DP groups too: ``new_group`` does not inherit the default group's
    timeout (torch's default is 30 minutes); ``startup.groups_default_to`` sets it."""
    from rank_processes import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_group_timeouts, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    found = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert found == [[timedelta(seconds=7)] * 3] * 2


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[10.216.16.2]:40109",
            "lost its peer 10.216.16.2 (connection closed by peer) in a collective; the job stops",
        ),
        (
            "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.159.119.2]:17541: "
            "Connection reset by peer",
            "lost its peer 10.159.119.2 (connection reset by peer) in a collective",
        ),
        (
            "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms "
            "for recv operation to complete",
            ": a collective got no answer within 15 s (parallel.timeout_s): a peer died or the network is "
            "partitioned",
        ),
    ],
)
def test_lost_peer_message_from_the_errors_gloo_raised(error: str, line: str) -> None:
    """The messages are the ones gloo raised in the tests above (copied from their logs)."""
    try:
        try:
            raise RuntimeError(error)
        except RuntimeError as exc:
            raise RuntimeError("all_to_all in the backward") from exc
    except RuntimeError as outer:
        message = lost_peer_message(outer)
    assert message is not None and line in message, message
    assert lost_peer_message(RuntimeError("CUDA out of memory")) is None
    assert lost_peer_message(ValueError("Connection closed by peer [1.2.3.4]:5")) is None
