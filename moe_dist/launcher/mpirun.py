"""Backend ``mpirun`` (OpenMPI): mpirun starts every rank; torch.distributed reads its variables.

Ranks learn their place from ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK`` (mapped to RANK,
WORLD_SIZE, LOCAL_RANK by ``moe_dist.parallel`` when RANK is absent) and meet at MASTER_ADDR:
MASTER_PORT, which we pass with ``-x`` together with the workers' environment. mpirun refuses
to run as root unless told, and counts slots by cores: as root we add ``--allow-run-as-root
--oversubscribe`` (containers often run as root).
"""

from __future__ import annotations

import os

from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.plan import WORKER_MODULE, LaunchPlan, free_port, python_for, train_args_for


def build(cluster: ClusterConfig, train_args: list[str]) -> LaunchPlan:
    c, m = cluster, cluster.mpirun
    argv = ["mpirun", "-np", str(c.world_size)]
    if c.hostfile:
        argv += ["--hostfile", str(c.resolve(c.hostfile))]
    elif c.hosts:
        argv += ["--host", ",".join(f"{h}:{c.procs_per_node}" for h in c.hosts)]
    if m.map_by or c.nodes > 1:
        argv += ["--map-by", m.map_by or f"ppr:{c.procs_per_node}:node"]
    if m.bind_to:
        argv += ["--bind-to", m.bind_to]
    if os.geteuid() == 0:
        argv += ["--allow-run-as-root", "--oversubscribe"]
    if m.rsh_agent:
        agent = c.resolve(m.rsh_agent) if "/" in m.rsh_agent else m.rsh_agent  # a name: on PATH
        argv += ["--mca", "plm_rsh_agent", str(agent)]
    if c.network.socket_ifname and c.nodes > 1:  # OpenMPI's own TCP traffic on the same NIC
        argv += ["--mca", "oob_tcp_if_include", c.network.socket_ifname]
        argv += ["--mca", "btl_tcp_if_include", c.network.socket_ifname]

    host, port = c.rdzv_host_port()
    if host is None or host == "localhost":
        host = "127.0.0.1"
    if port is None:  # no host named, so one node (validated): any free port here
        port = free_port()
    env = {"MASTER_ADDR": host, "MASTER_PORT": str(port), **c.worker_env()}
    for k, v in env.items():
        argv += ["-x", f"{k}={v}"]
    argv += c.extra_args
    argv += [python_for(c), "-m", WORKER_MODULE, *train_args_for(c, train_args)]
    return LaunchPlan(argv)
