"""Backend ``local``: ``procs_per_node`` workers on this machine (``torchrun --standalone``).

The demo's default. torchrun picks a free port, restarts the group up to ``max_restarts`` times
and stops every worker when one fails, so a local run behaves like one node of a cluster run.
"""

from __future__ import annotations

from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.container import docker_wrap
from moe_dist.launcher.plan import LaunchPlan, python_for
from moe_dist.launcher.torchrun import agent_env, torchrun_argv, torchrun_options


def build(cluster: ClusterConfig, train_args: list[str]) -> LaunchPlan:
    in_container = cluster.container is not None
    options = torchrun_options(cluster, None, cluster.rdzv_id, "1")
    argv = torchrun_argv(cluster, python_for(cluster, in_container), options, train_args)
    env = agent_env(cluster)
    if in_container:
        return LaunchPlan(docker_wrap(cluster, argv, env))
    return LaunchPlan(argv, env=env)
