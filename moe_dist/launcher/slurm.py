"""Backend ``slurm``: render an sbatch script from ``launch/sbatch.sh.tmpl`` and submit it.

Inside the job:
1. ``#SBATCH`` asks for ``nodes`` nodes with one task each (and GPUs per node on GPU nodes).
2. The first node of the allocation (``scontrol show hostnames "$SLURM_JOB_NODELIST" | head
   -n1``) hosts the c10d rendezvous; the job id is the rendezvous id.
3. ``srun`` starts one torchrun agent per node (in a pyxis/enroot or apptainer container when
   configured); torchrun starts ``procs_per_node`` workers and restarts them on failure.

Every value from the YAML or the command line is ``shlex.quote``-d into the script; ``#SBATCH``
values are single tokens (checked by the schema: sbatch reads those lines without a shell).
"""

from __future__ import annotations

import re
import shlex

from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.plan import LaunchPlan, python_for
from moe_dist.launcher.torchrun import agent_env, torchrun_argv, torchrun_options
from moe_dist.shipped_files import shipped_path

TEMPLATE = shipped_path("launch/sbatch.sh.tmpl")  # launch/sbatch.sh.tmpl, shipped as package data
RDZV_ENDPOINT = "__RDZV_ENDPOINT__"  # stands for "$rdzv_endpoint" until the line is quoted
RDZV_ID = "__RDZV_ID__"  # stands for "$SLURM_JOB_ID"


def directives(c: ClusterConfig) -> list[str]:
    s = c.slurm
    out = [f"--job-name={c.name}", f"--nodes={c.nodes}", "--ntasks-per-node=1", f"--output={s.output}"]
    gpus = (
        s.gpus_per_node if s.gpus_per_node is not None else (c.procs_per_node if c.devices == "gpu" else None)
    )
    if gpus:
        out.append(f"--gpus-per-node={gpus}")
    for key in ("partition", "account", "qos", "time", "mem"):
        value = getattr(s, key)
        if value is not None:
            out.append(f"--{key}={value}")
    if s.cpus_per_task:
        out.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.exclusive:
        out.append("--exclusive")
    return [*out, *s.directives]


def srun_options(c: ClusterConfig) -> list[str]:
    opts = [f"--nodes={c.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if c.container is not None and c.container.runtime == "pyxis":
        opts.append(f"--container-image={c.container.image}")
        if c.container.mounts:
            opts.append("--container-mounts=" + ",".join(c.container.mounts))
        if c.container.workdir:
            opts.append(f"--container-workdir={c.container.workdir}")
    return opts


def _quote_line(argv: list[str]) -> str:
    """Quote every word, then let the two job-time values expand (inside double quotes)."""
    line = " ".join(shlex.quote(a) for a in argv)
    return line.replace(RDZV_ENDPOINT, '"$rdzv_endpoint"').replace(RDZV_ID, '"$SLURM_JOB_ID"')


def render(c: ClusterConfig, train_args: list[str], source: str) -> str:
    in_container = c.container is not None
    options = torchrun_options(c, RDZV_ENDPOINT, RDZV_ID, str(c.nodes))
    command = torchrun_argv(c, python_for(c, in_container), options, train_args)
    if in_container and c.container.runtime == "apptainer":
        binds = [x for m in c.container.mounts for x in ("--bind", m)]
        nv = ["--nv"] if c.devices == "gpu" else []
        pwd = ["--pwd", c.container.workdir] if c.container.workdir else []
        command = ["apptainer", "exec", *nv, *binds, *pwd, c.container.image, *command]
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in agent_env(c).items())
    values = {
        "directives": "\n".join(f"#SBATCH {d}" for d in directives(c)),
        "source": shlex.quote(source).replace("\n", " "),
        "procs_per_node": str(c.procs_per_node),
        "exports": exports,
        "rdzv_port": str(c.rendezvous.port),
        "srun_options": " ".join(shlex.quote(o) for o in srun_options(c)),
        "command": _quote_line(command),
    }
    template_path = c.resolve(c.slurm.template) if c.slurm.template else TEMPLATE
    text = template_path.read_text()
    missing = sorted(set(re.findall(r"{{(\w+)}}", text)) - set(values))
    if missing:
        raise ValueError(f"slurm.template: {template_path} uses unknown placeholder(s) {missing}")
    return re.sub(r"{{(\w+)}}", lambda m: values[m.group(1)], text)


def build(cluster: ClusterConfig, train_args: list[str], source: str = "a cluster config") -> LaunchPlan:
    script = cluster.output_dir() / "job.sbatch"
    argv = ["sbatch", "--parsable"]
    if cluster.slurm.wait:
        argv.append("--wait")
    return LaunchPlan([*argv, str(script)], files={script: render(cluster, train_args, source)})
