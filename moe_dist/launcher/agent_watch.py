"""Stop a torchrun agent that hangs after its workers ended because its rendezvous host is gone.

torch's TCPStore client answers a read timeout by sending STOP_WAITING and then waits for the
server's acknowledgement with a ``recv`` that has no timeout (``TCPStore::doWait`` in
torch/csrc/distributed/c10d/TCPStore.cpp, torch 2.13). When the rendezvous host is unreachable
(a partition, a machine that lost power) that ``recv`` returns only when the link comes back or
the kernel gives up retransmitting (``net.ipv4.tcp_retries2``: about 15 minutes). A torchrun
agent polls the store between checks of its workers, so on a partitioned node it hangs there
although its workers ended on ``parallel.timeout_s`` (measured: ``test_multihost_faults.py``).

``wait_agent``: wait for the agent; once it has had workers and has none left, probe the
rendezvous host every second (a TCP connection; a refusal is an answer). When it has not
answered for ``grace_s`` (``rendezvous.read_timeout_s``, default 60), say so in one line, stop
the agent (SIGTERM, then SIGKILL) and return 1. While workers run, or while the agent is still
in its first rendezvous, torch's own timeouts apply; a node whose rendezvous host answers is
never stopped, so a restart that waits for a node to come back is left alone.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

from moe_dist.launcher.cluster_checks import RDZV_READ_TIMEOUT_S
from moe_dist.launcher.cluster_config import ClusterConfig


def _alive(pid: int) -> bool:
    """Running, not a zombie (a stuck agent does not reap its ended workers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a torchrun agent's workers)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(x) for x in (task / "children").read_text().split()]
    return [c for c in out if _alive(c)]


def answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def wait_agent(proc: subprocess.Popen, host: str, port: int, grace_s: float, poll_s: float = 1.0) -> int:
    """``proc.wait()``, but stop an agent left without workers whose rendezvous host is silent."""
    had_workers, silent_since = False, None
    while True:
        try:
            return proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
        if children(proc.pid):
            had_workers, silent_since = True, None
            continue
        if not had_workers or answers(host, port):
            silent_since = None
            continue
        silent_since = silent_since or time.monotonic()
        if time.monotonic() - silent_since >= grace_s:
            print(
                f"moe-dist launch: this node's workers have ended and the rendezvous host {host}:{port} "
                f"has not answered for {grace_s:g} s (rendezvous.read_timeout_s); stopping torchrun's "
                "agent, which would wait for it until the kernel's TCP retries give up",
                file=sys.stderr,
            )
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return 1


def agent_waiter(cluster: ClusterConfig) -> tuple[str, int, float] | None:
    """(host, port, grace) for ``wait_agent`` when this launch runs a multi-node torchrun agent."""
    host, port = cluster.rdzv_host_port()
    if cluster.backend != "torchrun" or cluster.nodes < 2 or host is None or port is None:
        return None
    return host, port, float(cluster.rendezvous.read_timeout_s or RDZV_READ_TIMEOUT_S)
