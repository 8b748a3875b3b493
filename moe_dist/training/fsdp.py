"""``parallel.data_parallel: fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) with experts placed by EP.

The layout follows torchtitan's FSDP + EP (``parallel/mesh.py`` draws the meshes):

1. Each MoE layer's ``GroupedExperts`` (already this EP rank's ``e`` experts) becomes its own
   FSDP unit over the expert-DP mesh: its weights, gradients and AdamW moments are split over
   the ranks that replicate that EP shard.
2. Each block becomes an FSDP unit over the whole world (its dense weights: attention, norms,
   router), then the root (embedding, final norm). Per-block units let the reduce-scatter of
   block i run while block i-1 still computes its backward: reduction overlaps the backward.
3. On CUDA the mixed-precision policy computes in bf16 parameters and reduces gradients in fp32.

Gradient scale: FSDP averages over its mesh. Dense gradients are averaged over the world, as
``grad_sync.py`` does. Expert gradients must be summed over expert-DP and divided by the world
(``grad_sync.py``'s docstring), but FSDP divides by the expert-DP size only, so
``ShardedGradients.finish`` scales them by ``1 / EP``. (``set_gradient_divide_factor`` would do it
inside the reduce-scatter, but it needs ``ReduceOp.PREMUL_SUM``, which gloo does not have.)

Global norm: every rank holds a disjoint shard of every dense gradient and of its EP shard's
expert gradients, so one all-reduce over the world of the local squared sums is the squared norm
of the full gradient, each expert counted once.

Shape legend: e local experts (per EP rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moe_dist.models import MoETransformer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.parallel.mesh import ParallelMeshes
from moe_dist.training.grad_sync import is_expert_param


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_model(model: MoETransformer, meshes: ParallelMeshes, bf16: bool) -> None:
    """Steps 1-3 of the module docstring, in place. Expert parameters keep their ``expert_parallel`` mark."""
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        if block.is_moe:
            fully_shard(block.ffn.experts, mesh=meshes.expert_dp, mp_policy=policy)
        fully_shard(block, mesh=meshes.dense, mp_policy=policy)
    # the root's parameters (embedding, tied to the output) are needed again at once by the backward
    fully_shard(model, mesh=meshes.dense, mp_policy=policy, reshard_after_forward=False)
    for block in model.blocks:
        if block.is_moe:
            for p in block.ffn.experts.parameters():
                p.expert_parallel = True  # type: ignore[attr-defined]  # fully_shard made new Parameters


class ShardedGradients:
    """Scale, measure and clip the gradients FSDP left sharded (module docstring)."""

    def __init__(self, model: nn.Module, groups: ParallelGroups) -> None:
        self.groups = groups
        params = [p for p in model.parameters() if p.requires_grad]
        self.dense = [p for p in params if not is_expert_param(p)]
        self.expert = [p for p in params if is_expert_param(p)]

    def finish(self) -> None:
        """Expert gradients from (1 / expert-DP) to (1 / world) times their sum."""
        if self.groups.ep_size > 1:
            for p in self.expert:
                if p.grad is not None:
                    local(p.grad).div_(self.groups.ep_size)

    def global_norm(self) -> torch.Tensor:
        shards = [local(p.grad) for p in self.dense + self.expert if p.grad is not None]
        sq = torch.stack([g.float().pow(2).sum() for g in shards]).sum() if shards else torch.zeros(())
        if self.groups.distributed:
            dist.all_reduce(sq, group=self.groups.world_group)
        return sq.sqrt()

    def clip(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so the global norm is <= ``max_norm`` (0 = no clipping); returns the norm."""
        norm = self.global_norm()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.dense + self.expert:
                if p.grad is not None:
                    local(p.grad).mul_(scale.to(p.grad.device))
        return norm
