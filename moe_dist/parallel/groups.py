"""Process groups for data x expert parallelism, passed down explicitly (no module globals).

Layout (expert-parallel ranks contiguous, as DeepSpeed's default and Megatron's EP-inner order):
world = DP x EP, ``rank = dp_index * EP + ep_index``. With world 4 and EP 2:

    EP groups        [0, 1] [2, 3]     experts are sharded inside one of these
    expert-DP groups [0, 2] [1, 3]     replicas of the same expert shard; expert grads reduce here
    world            [0, 1, 2, 3]      non-expert parameters are replicated; their grads reduce here

Expert ``e`` lives on EP rank ``e // (E / EP)`` as local expert ``e % (E / EP)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist

from moe_dist.config import ConfigError, EpTransport
from moe_dist.parallel.shm_transport import ShmTransport, shm_unavailable_reason


def ep_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The rank lists of the EP groups and the expert-DP groups (pure, so it is tested alone)."""
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} must divide the world size {world_size}")
    dp_size = world_size // ep_size
    ep_groups = [[dp * ep_size + e for e in range(ep_size)] for dp in range(dp_size)]
    expert_dp_groups = [[dp * ep_size + e for dp in range(dp_size)] for e in range(ep_size)]
    return ep_groups, expert_dp_groups


@dataclass
class ParallelGroups:
    """Who this rank talks to. ``None`` groups mean a single process (no collectives)."""

    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    ep_group: dist.ProcessGroup | None = None
    expert_dp_group: dist.ProcessGroup | None = None
    world_group: dist.ProcessGroup | None = None
    ep_shm: ShmTransport | None = None  # the EP group's shared-memory transport, when it has one

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls) -> ParallelGroups:
        return cls()

    @classmethod
    def build(cls, ep_size: int, ep_transport: EpTransport = "auto") -> ParallelGroups:
        """Create the groups from the default process group (every rank must call this).

        ``ep_transport``: how token rows cross the EP group. ``collective``: all-to-all of the
        backend. ``shm``: shared memory (``shm_transport``); needs a gloo group on one host, else
        a ``ConfigError``. ``auto``: shm where it can run, else collective."""
        if not dist.is_available() or not dist.is_initialized():
            if ep_size != 1:
                raise RuntimeError(
                    f"expert-parallel size {ep_size} needs torch.distributed to be initialised"
                )
            return cls.single()
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ep_groups, expert_dp_groups = ep_layout(world_size, ep_size)
        ep_group = expert_dp_group = None
        # new_group is collective: every rank creates every group, keeps its own.
        for ranks in ep_groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                ep_group = group
        for ranks in expert_dp_groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                expert_dp_group = group
        ep_shm = None
        if ep_transport != "collective" and ep_size > 1 and ep_group is not None:
            reason = shm_unavailable_reason(ep_group)
            if reason is None:
                try:
                    ep_shm = ShmTransport.build(ep_group)  # every rank succeeds or every rank raises
                except RuntimeError as exc:
                    reason = str(exc)
                    if ep_transport == "auto" and rank == 0:  # expected to work here: say why not
                        warnings.warn(f"parallel.ep_transport: using the all-to-all: {reason}", stacklevel=2)
            if reason is not None and ep_transport == "shm":
                raise ConfigError([f"parallel.ep_transport: shm is not possible here: {reason}"])
        return cls(
            rank=rank,
            world_size=world_size,
            ep_size=ep_size,
            ep_group=ep_group,
            expert_dp_group=expert_dp_group,
            world_group=dist.group.WORLD,
            ep_shm=ep_shm,
        )
