"""Distributed start-up: one call that works under torchrun, mpirun, SLURM, or none at all.

``init_distributed(cfg.parallel)`` reads the launch environment:

- torchrun / torch.distributed.run: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``.
- OpenMPI (when ``RANK`` is absent): ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``.
- SLURM (when neither is set): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``.
- nothing: a single process, no process group.

Under mpirun and SLURM the rendezvous address still comes from ``MASTER_ADDR``/``MASTER_PORT``
(the launcher exports them). Backend ``auto`` is NCCL when CUDA is available, else gloo; the
collective timeout is ``parallel.timeout_s``, so a dead peer ends the job instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_dist.config import ParallelConfig

# (rank, world size, local rank) variable names per launcher, in order of precedence.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
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
    if missing:
        raise LaunchEnvError(
            f"{info.launcher} launch of {info.world_size} processes: {' and '.join(missing)} not set "
            "(export the address and port of rank 0)"
        )
    backend = pick_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend, rank=info.rank, world_size=info.world_size, timeout=timedelta(seconds=cfg.timeout_s)
    )
    return info


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
