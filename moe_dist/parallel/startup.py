"""Distributed start-up: one call that works under torchrun, mpirun, SLURM, or none at all.

``init_distributed(cfg.parallel)`` reads the launch environment:

- torchrun / torch.distributed.run: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``.
- OpenMPI (when ``RANK`` is absent): ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``; MPICH / Intel MPI (Hydra): ``PMI_RANK``, ``PMI_SIZE``,
  ``MPI_LOCALRANKID``.
- SLURM (when neither is set): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``.
- nothing: a single process, no process group.

The rendezvous address comes from ``MASTER_ADDR``/``MASTER_PORT``. Under an MPI launch without
them (``mpirun -np 2 moe-dist train ...``), ``mpi4py`` supplies them: rank 0 takes its address
(loopback when every rank shares its host) and a free port and broadcasts both over
``MPI.COMM_WORLD``; rank, size and local rank come from MPI itself, so any MPI works.

Backend ``auto`` is NCCL when CUDA is available, else gloo; the collective timeout is
``parallel.timeout_s`` (default 600 s) for the default group and every group made after it
(``groups_default_to``), so a dead or unreachable peer ends the job instead of hanging it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_dist.config import ParallelConfig

# (rank, world size, local rank) variable names per launcher, in order of precedence.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


class LaunchEnvError(Exception):
    """The environment names a multi-process launch but lacks what the rendezvous needs."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | mpirun | slurm | single


def launch_info(env: dict[str, str] | os._Environ[str] | None = None) -> LaunchInfo:
    """Rank, world size and local rank from the environment (pure: tested without processes)."""
    env = os.environ if env is None else env
    for launcher, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env:
            try:
                rank, size = int(env[rank_var]), int(env.get(size_var, "1"))
                local = int(env.get(local_var, "0"))
            except ValueError as exc:
                raise LaunchEnvError(f"{launcher} environment: {exc}") from None
            if not 0 <= rank < size:
                raise LaunchEnvError(f"{launcher} environment: {rank_var}={rank} outside {size_var}={size}")
            return LaunchInfo(rank, size, local, launcher)
    return LaunchInfo(0, 1, 0, "single")


def pick_backend(cfg: ParallelConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: ParallelConfig) -> LaunchInfo:
    """Initialise the default process group when the launch has more than one process.

    Idempotent: if a process group already exists (tests, an outer framework), it is used.
    Under CUDA each process takes GPU ``local_rank``.
    """
    if dist.is_available() and dist.is_initialized():
        info = launch_info()
        return LaunchInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.launcher)
    info = launch_info()
    if info.world_size == 1:
        return info
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing and info.launcher == "mpirun":
        info = rendezvous_over_mpi()
        missing = []
    if missing:
        raise LaunchEnvError(
            f"{info.launcher} launch of {info.world_size} processes: {' and '.join(missing)} not set "
            "(export the address and port of rank 0)"
        )
    check_socket_ifname()
    backend = pick_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    timeout = timedelta(seconds=cfg.timeout_s)
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout)
    groups_default_to(timeout)
    return info


def check_socket_ifname(env: dict[str, str] | os._Environ[str] | None = None) -> None:
    """``GLOO_SOCKET_IFNAME`` (``network.socket_ifname``) must name interfaces of this host.

    gloo otherwise fails inside ``init_process_group`` with a C++ traceback on this host while
    the other hosts wait for it until the timeout. (NCCL's variable takes prefixes and ``^``
    exclusions; gloo's takes exact names, comma-separated.)"""
    value = (os.environ if env is None else env).get("GLOO_SOCKET_IFNAME")
    if not value:
        return
    have = sorted(name for _, name in socket.if_nameindex())
    missing = [n for n in value.split(",") if n not in have]
    if missing:
        raise LaunchEnvError(
            f"network.socket_ifname: GLOO_SOCKET_IFNAME={value} names {missing[0]!r}, which this host "
            f"({socket.gethostname()}) does not have; its interfaces: {', '.join(have)}"
        )


def groups_default_to(timeout: timedelta) -> None:
    """Make ``timeout`` the timeout of every process group created from now on without one.

    ``dist.new_group(ranks)`` does not inherit the default group's timeout: it takes torch's
    library default (``distributed_c10d._get_default_timeout``: 30 minutes for gloo and NCCL).
    Our EP and expert-DP groups, the checkpointer's gloo group and DeepSpeed's expert groups are
    all made that way, so without this a lost peer inside an all-to-all would hang for 30
    minutes whatever ``parallel.timeout_s`` says. torch reads these module globals each time a
    group is made; there is no public setter.
    """
    import torch.distributed.distributed_c10d as c10d  # noqa: PLC0415 - torch's own module

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def rendezvous_over_mpi() -> LaunchInfo:
    """Rank 0's address and a free port, broadcast with mpi4py, exported as MASTER_ADDR/PORT."""
    try:
        from mpi4py import MPI  # noqa: PLC0415 - only for an MPI launch without MASTER_ADDR
    except ImportError as exc:
        raise LaunchEnvError(
            f"mpirun launch without MASTER_ADDR needs mpi4py (pip install 'moe-dist[mpi]'): {exc}"
        ) from None
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_host = node.Get_size() == comm.Get_size()
    where = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        where = ("127.0.0.1" if one_host else socket.gethostbyname(socket.getfqdn()), port)
    addr, port = comm.bcast(where, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    return LaunchInfo(comm.Get_rank(), comm.Get_size(), node.Get_rank(), "mpirun")


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
