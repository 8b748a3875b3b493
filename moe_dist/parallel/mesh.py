"""Device meshes for FSDP2 and DCP, laid over the same ranks as ``groups.ParallelGroups``.

With world = DP x EP and EP ranks contiguous (``rank = dp_index * EP + ep_index``), e.g. world 4,
EP 2::

    dense       1-D over the world [0, 1, 2, 3]: non-expert parameters are sharded over every rank
    ep_dp       2-D (ep, dp) = [[0, 2], [1, 3]]: row i holds the replicas of EP shard i
    expert_dp   ep_dp["dp"], this rank's row: [0, 2] or [1, 3]; expert parameters shard over it

``ep_dp`` lists EP first so that a tensor sharded ``(Shard(0), Shard(0))`` on it splits the global
expert axis into EP blocks first (global expert g = ep_rank * e + local id, as ``groups.py``), then
each EP block into the FSDP shards of its expert-DP group. That is how a checkpoint stores experts
in the global layout, whatever the EP and DP sizes (``training/dcp_checkpoint.py``).

Building a mesh creates process groups: every rank must build the same meshes in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

from moe_dist.parallel.groups import ParallelGroups


def ep_dp_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """The (ep, dp) rank grid of ``ep_dp`` (pure, tested alone): row = EP index, column = DP index."""
    dp_size = world_size // ep_size
    return [[dp * ep_size + ep for dp in range(dp_size)] for ep in range(ep_size)]


@dataclass
class ParallelMeshes:
    dense: DeviceMesh
    ep_dp: DeviceMesh

    @property
    def expert_dp(self) -> DeviceMesh:
        return self.ep_dp["dp"]

    @classmethod
    def build(cls, groups: ParallelGroups, device_type: str) -> ParallelMeshes:
        """Collective: needs an initialised default process group."""
        dense = DeviceMesh(device_type, torch.arange(groups.world_size), mesh_dim_names=("world",))
        grid = torch.tensor(ep_dp_ranks(groups.world_size, groups.ep_size))
        return cls(dense=dense, ep_dp=DeviceMesh(device_type, grid, mesh_dim_names=("ep", "dp")))
