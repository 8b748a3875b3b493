"""Cluster configs: where and how many processes run, as a typed, validated tree (the schema).

A cluster YAML says which launcher starts the workers (``backend``), how many nodes and
processes per node, which hosts, the rendezvous, restarts, container, environment and network
settings. Each field checks itself here; ``cluster_checks.py`` checks fields against each other
and ``cluster_loading.py`` reads the YAML, applies ``--set`` and reports every error at once.

Every string that may reach a shell script or a generated file (hostfile, sbatch directives) is
checked here: no control characters anywhere, and strict character sets where a value lands
unquoted in a line another program parses (host names, ``#SBATCH`` values).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from moe_dist.config import Section
from moe_dist.launcher.hostfile import HOST, parse_hostfile

Backend = Literal["local", "torchrun", "deepspeed", "mpirun", "slurm"]
BACKENDS: tuple[str, ...] = Backend.__args__  # type: ignore[attr-defined]

DEFAULT_RDZV_PORT = 29400
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DIRECTIVE = re.compile(r"^[^\s\x00-\x1f\x7f]+$")  # one token: sbatch reads #SBATCH lines without a shell


def _scalar_to_str(v: Any) -> Any:
    """YAML turns ``1`` and ``true`` into numbers and booleans; environment values are strings."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int | float):
        return str(v)
    return v


class RendezvousConfig(Section):
    endpoint: str | None = Field(
        None, description="HOST:PORT of the c10d rendezvous / master; default: first host and `port`"
    )
    port: int = Field(DEFAULT_RDZV_PORT, ge=1, le=65535, description="port when endpoint is not given")
    id: str | None = Field(None, description="rendezvous id shared by all agents; default: cluster name")
    join_timeout_s: int = Field(600, ge=1, description="how long agents wait for all nodes to join")
    last_call_timeout_s: int = Field(30, ge=1, description="extra wait after the minimum number joined")
    read_timeout_s: int | None = Field(
        None,
        ge=1,
        description="torchrun c10d: limit of each rendezvous store operation, connecting included (an "
        "unreachable rendezvous host fails after this long); default torch's 60",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT with a port in 1..65535, e.g. node001:29400")
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-'")
        return v


class ContainerConfig(Section):
    image: str = Field(description="image reference, e.g. registry/moe_dist:0.1.0 or a .sqsh/.sif file")
    runtime: Literal["docker", "pyxis", "apptainer"] = Field(
        "docker", description="docker: local/torchrun wrap each agent in `docker run`; pyxis/apptainer: slurm"
    )
    mounts: list[str] = Field(default_factory=list, description="SRC:DST[:ro] bind mounts")
    workdir: str | None = Field(None, description="working directory inside the container")

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, v: list[str]) -> list[str]:
        for m in v:
            parts = m.split(":")
            if (
                len(parts) not in (2, 3)
                or not all(parts[:2])
                or (len(parts) == 3 and parts[2] not in ("ro", "rw"))
            ):
                raise ValueError(f"each mount must be SRC:DST or SRC:DST:ro, got {m!r}")
            if "," in m:
                raise ValueError(f"a mount must not contain ',' (pyxis separates mounts with it), got {m!r}")
        return v


class NetworkConfig(Section):
    socket_ifname: str | None = Field(
        None, description="NIC for NCCL and gloo sockets (NCCL/GLOO_SOCKET_IFNAME)"
    )
    nccl_debug: Literal["VERSION", "WARN", "INFO", "TRACE"] | None = None
    nccl_ib_disable: bool | None = Field(None, description="true: no InfiniBand (NCCL_IB_DISABLE=1)")
    nccl_env: dict[str, str] = Field(default_factory=dict, description="any other NCCL_* variables")

    @field_validator("nccl_env", mode="before")
    @classmethod
    def _nccl_env(cls, v: Any) -> Any:
        if isinstance(v, dict):
            bad = [k for k in v if not (isinstance(k, str) and k.startswith("NCCL_") and _ENV_KEY.match(k))]
            if bad:
                raise ValueError(f"keys must be NCCL_* variable names, got {bad[0]!r}")
            return {k: _scalar_to_str(x) for k, x in v.items()}
        return v

    def to_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.socket_ifname:
            env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = self.socket_ifname
        if self.nccl_debug:
            env["NCCL_DEBUG"] = self.nccl_debug
        if self.nccl_ib_disable is not None:
            env["NCCL_IB_DISABLE"] = "1" if self.nccl_ib_disable else "0"
        return {**env, **self.nccl_env}


class TelemetryLaunchConfig(Section):
    """Becomes ``--set telemetry.*`` overrides on the train command (the user's own --set wins)."""

    enabled: bool | None = None
    port_base: int | None = Field(
        None, ge=0, le=65535, description="rank r listens on port_base + local rank"
    )
    file_sd_path: str | None = Field(None, description="Prometheus file_sd target file the job writes")


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = Field(None, description="wall-clock limit, e.g. 04:00:00 or 1-00:00:00")
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPUs for each node's torchrun agent and its workers"
    )
    gpus_per_node: int | None = Field(None, ge=0, description="default: procs_per_node when devices is gpu")
    mem: str | None = Field(None, description="memory per node, e.g. 0 (all) or 480G")
    output: str = Field("slurm-%x-%j.out", description="stdout/stderr file (sbatch patterns allowed)")
    exclusive: bool = False
    directives: list[str] = Field(
        default_factory=list, description="more #SBATCH options, e.g. --constraint=h100"
    )
    template: str | None = Field(
        None, description="sbatch template; default: the shipped launch/sbatch.sh.tmpl"
    )
    wait: bool = Field(False, description="sbatch --wait: return when the job ends, with its exit code")

    @field_validator("partition", "account", "qos", "time", "mem", "output")
    @classmethod
    def _one_token(cls, v: str | None) -> str | None:
        if v is not None and not _DIRECTIVE.match(v):
            raise ValueError("must be one token without spaces (it becomes an #SBATCH line)")
        return v

    @field_validator("directives")
    @classmethod
    def _directives(cls, v: list[str]) -> list[str]:
        for d in v:
            if not d.startswith("--") or not _DIRECTIVE.match(d):
                raise ValueError(
                    f"each directive must be one --option[=value] token without spaces, got {d!r}"
                )
        return v


class DeepSpeedLaunchConfig(Section):
    no_ssh: bool = Field(False, description="run the launcher on every node yourself (with --node-rank)")
    launcher: Literal["pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm"] = Field(
        "pdsh", description="how the deepspeed launcher reaches the other nodes (multi-node, with ssh)"
    )
    launcher_args: str | None = Field(
        None, description="passed as --launcher_args=VALUE, e.g. --oversubscribe"
    )


class MpirunConfig(Section):
    map_by: str | None = Field(
        None, description="--map-by value; default ppr:<procs_per_node>:node on >1 node"
    )
    bind_to: str | None = Field(None, description="--bind-to value, e.g. none or core")
    rsh_agent: str | None = Field(
        None,
        description="program OpenMPI runs instead of ssh to start its daemon on the other hosts "
        "(`AGENT HOST COMMAND...`, --mca plm_rsh_agent); a path is relative to the YAML",
    )


class ClusterConfig(Section):
    name: str = Field("moe_dist", description="job name: rendezvous id, SLURM job name, file names")
    backend: Backend
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, ge=1, description="worker processes per node (one per GPU on GPU nodes)")
    devices: Literal["cpu", "gpu"] = Field("cpu", description="gpu: each node needs procs_per_node GPUs")
    hosts: list[str] = Field(default_factory=list, description="node host names, first = rendezvous host")
    hostfile: str | None = Field(
        None, description="MPI-style hostfile (`host slots=N` lines) instead of hosts"
    )
    node_rank: int | None = Field(None, ge=0, description="this node's rank, where the backend needs one")
    max_restarts: int = Field(0, ge=0, description="torchrun restarts of the whole worker group on a failure")
    python: str | None = Field(
        None, description="worker interpreter; default: this one (in containers: python)"
    )
    launch_dir: str = Field(
        "runs/launch", description="where generated hostfiles and sbatch scripts go (relative: to the cwd)"
    )
    env: dict[str, str] = Field(default_factory=dict, description="environment for every worker")
    extra_args: list[str] = Field(
        default_factory=list, description="more launcher options (torchrun/mpirun/...)"
    )
    rendezvous: RendezvousConfig = Field(default_factory=RendezvousConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    telemetry: TelemetryLaunchConfig = Field(default_factory=TelemetryLaunchConfig)
    container: ContainerConfig | None = None
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    deepspeed: DeepSpeedLaunchConfig = Field(default_factory=DeepSpeedLaunchConfig)
    mpirun: MpirunConfig = Field(default_factory=MpirunConfig)

    # where relative paths (hostfile, template) are resolved from: the cluster YAML's folder
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names files and the job)")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        bad = [h for h in v if not HOST.match(h)]
        if bad:
            raise ValueError(f"not a host name or address: {bad[0]!r}")
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        if isinstance(v, dict):
            bad = [k for k in v if not (isinstance(k, str) and _ENV_KEY.match(k))]
            if bad:
                raise ValueError(f"not an environment variable name: {bad[0]!r}")
            return {k: _scalar_to_str(x) for k, x in v.items()}
        return v

    # ------------------------------------------------------------ derived values

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def resolve(self, path: str) -> Path:
        """An input file named in the YAML (hostfile, template): relative to the YAML's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self._base_dir / p

    def output_dir(self) -> Path:
        """Where generated files go: ``launch_dir/name``, relative to the working directory."""
        return Path(self.launch_dir).expanduser().absolute() / self.name

    def node_hosts(self) -> list[str]:
        """The hosts of the job, in node order (from ``hosts`` or the hostfile)."""
        if self.hosts:
            return list(self.hosts)
        if self.hostfile:
            return [h for h, _ in parse_hostfile(self.resolve(self.hostfile).read_text())][: self.nodes]
        return []

    def rdzv_host_port(self) -> tuple[str | None, int | None]:
        """(host, port) of the rendezvous; (None, None) when nothing names a host."""
        if self.rendezvous.endpoint:
            host, _, port = self.rendezvous.endpoint.rpartition(":")
            return host, int(port)
        hosts = self.node_hosts()
        return (hosts[0], self.rendezvous.port) if hosts else (None, None)

    @property
    def rdzv_id(self) -> str:
        return self.rendezvous.id or self.name

    def worker_env(self) -> dict[str, str]:
        """Variables every worker gets: the network settings, then ``env`` (which wins)."""
        return {**self.network.to_env(), **self.env}
