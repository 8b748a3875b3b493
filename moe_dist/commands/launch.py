"""``moe-dist launch CLUSTER.yaml [--dry-run] [--set k=v] -- train CONFIG.yaml [--set ...]``.

1. Load and validate the cluster YAML (its own ``--set`` overrides before the ``--``).
2. Check the train config now, with the launch's world size, and the resume decision (a fresh
   start on a run that has checkpoints is refused), so a bad start fails here with one message,
   not after a SLURM queue wait, on 64 nodes at once or under torchrun's worker tracebacks.
   With ``max_restarts > 0`` a ``train`` command gets ``--resume`` (said once): a restarted
   worker group continues from its newest checkpoint (``plan.resume_on_restart``).
3. Build the backend's plan: argument list, added environment, files (hostfile, sbatch script).
4. ``--dry-run`` prints the plan (SLURM: also writes the sbatch script, to submit by hand);
   otherwise check this node (launcher on PATH, GPUs when
   ``devices: gpu``), write the files and run the argument list, forwarding SIGINT/SIGTERM,
   and exit with its status. Bad input exits 2 with one message per problem, no traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from moe_dist.config import ConfigError, load_config
from moe_dist.launcher import deepspeed_runner, local, mpirun, slurm, torchrun
from moe_dist.launcher.agent_watch import agent_waiter, wait_agent
from moe_dist.launcher.cluster_checks import this_node_network_errors
from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.cluster_loading import load_cluster_config
from moe_dist.launcher.plan import LaunchPlan, resume_on_restart, train_args_for
from moe_dist.training.checkpoint_choice import refuse_existing_checkpoints

BUILDERS: dict[str, Callable[[ClusterConfig, list[str]], LaunchPlan]] = {
    "local": local.build,
    "torchrun": torchrun.build,
    "deepspeed": deepspeed_runner.build,
    "mpirun": mpirun.build,
}
USAGE_EXAMPLE = "moe-dist launch configs/cluster/local.yaml -- train configs/demo.yaml"


def build_plan(cluster: ClusterConfig, train_args: list[str], source: str = "a cluster config") -> LaunchPlan:
    if cluster.backend == "slurm":
        return slurm.build(cluster, train_args, source)
    return BUILDERS[cluster.backend](cluster, train_args)


def precheck_train(cluster: ClusterConfig, train_args: list[str]) -> None:
    """Validate ``train CONFIG.yaml --set ...`` as the workers will see it, and refuse a fresh
    start (no ``--resume``) on a run that has checkpoints, as the workers would; raises ConfigError."""
    if len(train_args) < 2 or train_args[0] != "train" or not train_args[1].endswith((".yaml", ".yml")):
        return
    if cluster.container is not None and not Path(train_args[1]).is_file():
        return  # it may exist only inside the container's mounts
    args = train_args_for(cluster, train_args)
    overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    overrides += [a[len("--set=") :] for a in args if a.startswith("--set=")]
    cfg = load_config(train_args[1], overrides, world_size=cluster.world_size)
    resumes = any(a == "--resume" or a.startswith("--resume=") for a in args)
    if not resumes and cluster.container is None:  # in a container, the run dir is the container's path
        refuse_existing_checkpoints(cfg.run_dir / "checkpoints")


def check_this_node(cluster: ClusterConfig, plan: LaunchPlan) -> list[str]:
    """What this machine lacks to run the plan: the launcher program, GPUs."""
    errors = []
    program = plan.argv[0]
    if shutil.which(program) is None and not Path(program).is_file():
        hint = {"mpirun": " (OpenMPI: Debian openmpi-bin)", "sbatch": " (SLURM client: Debian slurm-client)"}
        errors.append(f"backend: {program} not found on PATH{hint.get(program, '')}")
    if cluster.devices == "gpu" and cluster.backend != "slurm":  # SLURM checks on the compute nodes
        import torch

        have = torch.cuda.device_count()
        if have < cluster.procs_per_node:
            errors.append(
                f"procs_per_node: {cluster.procs_per_node} processes need {cluster.procs_per_node} GPUs "
                f"(devices: gpu), this machine has {have}"
            )
    return errors


def write_files(plan: LaunchPlan) -> None:
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if text.startswith("#!"):
            path.chmod(0o755)


def run_plan(plan: LaunchPlan, agent: tuple[str, int, float] | None = None) -> int:
    """Run the plan; ``agent`` (host, port, grace): a torchrun agent to watch (``agent_watch``)."""
    write_files(plan)
    proc = subprocess.Popen(plan.argv, env={**os.environ, **plan.env})

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)  # the launcher below stops its workers and exits

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait() if agent is None else wait_agent(proc, *agent)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - code if code < 0 else code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-dist launch",
        description="Start a moe-dist command on a cluster described by a cluster YAML.",
        epilog=f"example: {USAGE_EXAMPLE} --set schedule.steps=50",
    )
    p.add_argument("cluster", help="cluster YAML (configs/cluster/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the command / script instead of running it")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (overrides node_rank)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a cluster YAML key"
    )
    return p


def add_launch_parser(subparsers: argparse._SubParsersAction) -> None:
    """``moe-dist launch``: options as in ``parser()``; everything after the cluster YAML is ours."""
    p = subparsers.add_parser(
        "launch",
        help="start a command on a cluster (torchrun, deepspeed, mpirun, SLURM) from a cluster YAML",
        description=parser().description,
        epilog=parser().epilog,
        usage="moe-dist launch CLUSTER.yaml [--dry-run] [--node-rank N] [--set KEY=VALUE] -- COMMAND ...",
    )
    for action in parser()._actions:
        if action.option_strings and action.dest != "help":
            p._add_action(action)
    p.add_argument("cluster", help="cluster YAML (configs/cluster/*.yaml)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- COMMAND ARGS, e.g. -- train configs/demo.yaml")
    p.set_defaults(func=_run_from_cli)


def _run_from_cli(args: argparse.Namespace) -> int:
    own = [args.cluster, *(f"--set={s}" for s in args.set)]
    own += ["--dry-run"] if args.dry_run else []
    own += [f"--node-rank={args.node_rank}"] if args.node_rank is not None else []
    rest = list(args.rest)
    if "--" not in rest and rest and not rest[0].startswith("-"):
        rest.insert(0, "--")  # argparse drops a `--` that follows the cluster YAML directly
    return main([*own, *rest])


def main(argv: list[str]) -> int:
    if "--" in argv:
        cut = argv.index("--")
        own, train_args = argv[:cut], argv[cut + 1 :]
    else:
        own, train_args = argv, []
    args, unknown = parser().parse_known_args(own)
    if unknown:
        print(
            f"moe-dist launch: unexpected {' '.join(unknown)!r}; put the command to launch after --, "
            f"e.g. {USAGE_EXAMPLE}",
            file=sys.stderr,
        )
        return 2
    if not train_args:
        print(
            f"moe-dist launch: nothing to launch; put the command after --, e.g. {USAGE_EXAMPLE}",
            file=sys.stderr,
        )
        return 2
    overrides = list(args.set) + ([f"node_rank={args.node_rank}"] if args.node_rank is not None else [])
    try:
        cluster = load_cluster_config(args.cluster, overrides)
        precheck_train(cluster, train_args)  # the user's own arguments: a fresh start is refused
        train_args, note = resume_on_restart(cluster, train_args)
        if note:
            print(f"moe-dist launch: {note}", file=sys.stderr)
        plan = build_plan(cluster, train_args, args.cluster)
    except (ConfigError, OSError, ValueError) as exc:  # bad YAML, unreadable template, ...
        print(f"moe-dist launch: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(plan.render())
        if cluster.backend == "slurm":  # the script is the product: write it to inspect and submit
            write_files(plan)
            for path in plan.files:
                print(f"# wrote {path}; submit it with: sbatch {path}")
        return 0
    errors = check_this_node(cluster, plan) + this_node_network_errors(cluster)
    if errors:
        print(
            f"moe-dist launch: cannot launch {args.cluster} here:\n" + "\n".join(f"  {e}" for e in errors),
            file=sys.stderr,
        )
        return 2
    return run_plan(plan, agent_waiter(cluster))
