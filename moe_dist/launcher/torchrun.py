"""Backend ``torchrun``: one elastic agent per node, c10d rendezvous between the nodes.

One node without a rendezvous endpoint runs ``--standalone``; otherwise every node runs the
same command (``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB``),
the agent on HOST serving the rendezvous store. ``--max-restarts R`` restarts the whole worker
group when a worker dies; ``train --resume`` then continues from the latest checkpoint.

The c10d rendezvous ignores ``--node-rank`` (torch warns so): it numbers the nodes by their
sorted addresses, each node's address being ``--local-addr`` or else its FQDN, and a restarted
group's workers meet at rank 0's address. So when ``node_rank`` is known and the hosts are
listed, we also pass ``--local-addr hosts[node_rank]``: the address the cluster YAML names,
which the other nodes reach, instead of whatever this node's FQDN resolves to (a management
network, or nothing). The nodes then rank in the string order of those addresses (``node001``
before ``node002``, but ``10.0.0.10`` before ``10.0.0.9``); global ranks follow node ranks.
"""

from __future__ import annotations

from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.container import docker_wrap
from moe_dist.launcher.plan import WORKER_MODULE, LaunchPlan, python_for, rdzv_conf, train_args_for


def agent_env(cluster: ClusterConfig) -> dict[str, str]:
    """The agent's and workers' environment: ``cluster.worker_env()``, plus, when restarts are on,
    a store per restart. torch >= 2.5 shares the rendezvous TCPStore with the workers and keeps
    it across restarts, so a restarted group reads the dead group's gloo/NCCL addresses and
    hangs or fails to connect (pytorch/pytorch#135712); a store per rendezvous round avoids it.
    """
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if cluster.max_restarts else {}
    return {**env, **cluster.worker_env()}


def torchrun_options(cluster: ClusterConfig, endpoint: str | None, rdzv_id: str, nnodes: str) -> list[str]:
    """torchrun's options (without the program): standalone when ``endpoint`` is None."""
    if endpoint is None:
        opts = ["--standalone", "--nnodes", "1"]
    else:
        opts = [
            "--nnodes",
            nnodes,
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            rdzv_id,
        ]
        conf = rdzv_conf(cluster)
        if cluster.rendezvous.read_timeout_s is not None:
            conf += f",read_timeout={cluster.rendezvous.read_timeout_s}"
        opts += ["--rdzv-conf", conf]
        if cluster.node_rank is not None:
            opts += ["--node-rank", str(cluster.node_rank)]
            hosts = cluster.node_hosts()
            if cluster.node_rank < len(hosts):  # this node as the others reach it (see module doc)
                opts += ["--local-addr", hosts[cluster.node_rank]]
    opts += ["--nproc-per-node", str(cluster.procs_per_node), "--max-restarts", str(cluster.max_restarts)]
    return [*opts, *cluster.extra_args]


def torchrun_argv(
    cluster: ClusterConfig, python: str, options: list[str], train_args: list[str]
) -> list[str]:
    # `python -m torch.distributed.run` is torchrun, run by the interpreter that has our packages
    return [
        python,
        "-m",
        "torch.distributed.run",
        *options,
        "-m",
        WORKER_MODULE,
        *train_args_for(cluster, train_args),
    ]


def build(cluster: ClusterConfig, train_args: list[str]) -> LaunchPlan:
    in_container = cluster.container is not None
    host, port = cluster.rdzv_host_port()
    endpoint = None if host is None else f"{host}:{port}"
    options = torchrun_options(cluster, endpoint, cluster.rdzv_id, str(cluster.nodes))
    argv = torchrun_argv(cluster, python_for(cluster, in_container), options, train_args)
    env = agent_env(cluster)
    notes = []
    if cluster.nodes > 1:
        notes.append(
            f"run this same command on each of the {cluster.nodes} nodes; the agents meet at {endpoint}"
        )
    if in_container:
        return LaunchPlan(docker_wrap(cluster, argv, env), notes=notes)
    return LaunchPlan(argv, env=env, notes=notes)
