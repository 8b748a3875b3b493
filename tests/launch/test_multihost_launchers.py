"""Every launcher that needs no scheduler, across two real network hosts (``two_hosts.TwoHosts``).

The cluster YAML names the hosts' addresses and their NIC (``network.socket_ifname``); each
host is a network namespace with its own address, hostname and routes, so the rendezvous
and the gloo sockets cross the link between them. ``DP2xEP2`` runs two processes per host: EP
inside a host, data parallel and expert-data parallel across the hosts; ``EP2`` (one process
per host, the EP all-to-all crossing the hosts) runs with torchrun in
``test_multihost_telemetry.py`` and ``test_multihost_faults.py``; add ``EP2`` pairs to
``RUNS`` for the other launchers (about 30 s each for mpirun, 60 s for deepspeed on a busy
2-core machine). The 20-step losses must equal the same run with ``backend: local`` on one
host, and the workers seen in each host's namespace must be the ranks that host was given.

- torchrun: the same launch on each host with ``--node-rank``; c10d rendezvous on host 0.
- deepspeed: ``deepspeed.no_ssh`` and ``--node-rank`` on each host.
- mpirun: one launch on host 0; OpenMPI starts its daemon on host 1 through
  ``mpirun.rsh_agent``, here a script that runs the command in host 1's namespace (on a
  cluster: ssh, the default).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch_helpers import logged_losses
from multihost_launch import (
    assert_same_losses,
    cross_host_cluster,
    launch_on_hosts,
    one_host_losses,
    train_cmd,
)
from two_hosts import TwoHosts, no_leftovers, two_hosts  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]
PER_HOST = {"EP2": 1, "DP2xEP2": 2}  # processes per host; tiny.yaml has ep_size 2
RUNS = [("torchrun", "DP2xEP2"), ("deepspeed", "DP2xEP2"), ("mpirun", "DP2xEP2")]


@pytest.mark.parametrize(("backend", "layout"), RUNS)
def test_launcher_across_two_hosts_matches_one_host(
    backend: str,
    layout: str,
    two_hosts: TwoHosts,  # noqa: F811
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    per_host = PER_HOST[layout]
    cluster = cross_host_cluster(tmp_path, backend, two_hosts, backend, per_host)
    on = (0,) if backend == "mpirun" else (0, 1)  # mpirun starts host 1's ranks itself
    outs, seen = launch_on_hosts(two_hosts, cluster, train_cmd(tmp_path, tmp_path / "runs"), tmp_path, on=on)
    assert f"world {2 * per_host} = DP {per_host} x EP 2" in "".join(outs)
    # host 0 runs the first per_host ranks (c10d: sorted --local-addr; deepspeed/mpirun: hosts order)
    assert seen == [set(range(per_host)), set(range(per_host, 2 * per_host))]
    want = one_host_losses(tmp_path_factory, 2 * per_host)
    assert_same_losses(logged_losses(tmp_path / "runs" / "tiny"), want)
