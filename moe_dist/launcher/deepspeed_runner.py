"""Backend ``deepspeed``: the DeepSpeed launcher, from a hostfile we generate.

1. Hostfile: the configured one, or ``HOST slots=procs_per_node`` per host (``localhost`` on
   one node), written under ``launch_dir``.
2. One node, or ``deepspeed.no_ssh``: each node runs the launcher itself with ``--no_ssh
   --node_rank N`` (no ssh to localhost needed). Several nodes otherwise: the launcher reaches
   them with ``deepspeed.launcher`` (pdsh by default) from node 0.
3. ``--master_addr`` is always given (else DeepSpeed asks the first host over ssh), and
   ``--module --no_local_rank`` run ``python -m moe_dist.cli`` without a ``--local_rank`` arg.
4. The workers' environment reaches remote nodes through a DeepSpeed env file (``DS_ENV_FILE``).
   The pdsh runner pastes exports and program arguments into a remote shell line, so on that
   path we shell-quote them ourselves.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.plan import WORKER_MODULE, LaunchPlan, free_port, python_for, train_args_for


def build(cluster: ClusterConfig, train_args: list[str]) -> LaunchPlan:
    c, d = cluster, cluster.deepspeed
    run_dir = c.output_dir()
    files: dict[Path, str] = {}
    if c.hostfile:
        hostfile = c.resolve(c.hostfile)
    else:
        hostfile = run_dir / "hostfile"
        hosts = c.hosts or ["localhost"]
        files[hostfile] = "".join(f"{h} slots={c.procs_per_node}\n" for h in hosts)

    host, port = c.rdzv_host_port()
    if host is None or host == "localhost":
        host = "127.0.0.1"
    if port is None:  # no host named, so one node (validated): any free port here
        port = free_port()

    argv = [python_for(c), "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
    argv += ["--num_nodes", str(c.nodes), "--num_gpus", str(c.procs_per_node)]
    argv += ["--master_addr", host, "--master_port", str(port)]
    env = c.worker_env()
    plan_env: dict[str, str] = {}
    notes: list[str] = []
    program_args = train_args_for(c, train_args)
    ssh_launch = c.nodes > 1 and not d.no_ssh
    if ssh_launch:
        argv += ["--launcher", d.launcher]
        if d.launcher_args:
            argv.append(f"--launcher_args={d.launcher_args}")
        if env:
            quote = shlex.quote if d.launcher == "pdsh" else str
            env_file = run_dir / "deepspeed_env"
            files[env_file] = "".join(f"{k}={quote(v)}\n" for k, v in env.items())
            plan_env["DS_ENV_FILE"] = str(env_file)  # an absolute name: DeepSpeed joins it onto ~ and .
        if d.launcher == "pdsh":
            program_args = [shlex.quote(a) for a in program_args]
    else:
        node_rank = c.node_rank if c.node_rank is not None else 0
        argv += ["--no_ssh", "--node_rank", str(node_rank)]
        plan_env.update(env)
        if c.nodes > 1:
            notes.append(
                f"run this on each of the {c.nodes} nodes with its own --node-rank (0..{c.nodes - 1})"
            )
    argv += [*c.extra_args, "--module", "--no_local_rank", WORKER_MODULE, *program_args]
    return LaunchPlan(argv, env=plan_env, files=files, notes=notes)
