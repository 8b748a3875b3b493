"""Gradient reduction for data x expert parallelism, and the global gradient norm.

Which group reduces what (see ``moe_dist.parallel.groups`` for the layout):

- non-expert parameters are replicated on every rank: their gradients are summed over the
  world group;
- expert parameters (``p.expert_parallel``) exist once per expert-DP group: their gradients are
  summed over that group only. The all-to-all backward already brought each expert the
  gradient of every token it served, from every EP rank.

Both sums are divided by the world size: the loss of the step is the mean of the ranks' losses,
so every gradient is (1 / world) * sum over ranks. This makes EP=2 on 2 ranks and EP=1 (DP=2)
on 2 ranks compute the same update from the same data.

Gradients are packed into flat buckets (``bucket_mb``), one all-reduce per bucket, so a step
issues a handful of collectives, not one per tensor. Under ``parallel.data_parallel: ddp`` torch's
DDP has already averaged the dense gradients over the world during the backward
(``dense_reduced``); only the expert gradients are reduced here.

Global norm: non-expert gradients are identical on every rank after the reduction; expert
gradients differ across EP ranks (different experts), so their squared norms are summed over the
EP group. ``sqrt(dense_sq + sum_EP expert_sq)`` is then the norm of the full gradient vector and
every rank computes the same value.

Launches: the norm, the clip scale, the division and the unpacking of a bucket are each one
``torch._foreach_*`` call over all tensors (a few multi-tensor kernels on a GPU), not one op per
parameter: a step's launch count does not grow with the number of parameters
(``tests/training/test_step_launches.py``). The norm is torch's ``clip_grad_norm_`` order: per-tensor
L2 norms in fp32, then the norm of those.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.parallel.groups import ParallelGroups


def is_expert_param(p: nn.Parameter) -> bool:
    return bool(getattr(p, "expert_parallel", False))


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, each bucket at most ``bucket_bytes`` (or one tensor)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if (
            out
            and size + nbytes <= bucket_bytes
            and out[-1][0].dtype == t.dtype
            and out[-1][0].device == t.device
        ):
            out[-1].append(t)
            size += nbytes
        else:
            out.append([t])
            size = nbytes
    return out


def _all_reduce_mean(
    grads: list[torch.Tensor], group: dist.ProcessGroup | None, divisor: int, bucket_bytes: int
) -> None:
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        parts = flat.split([g.numel() for g in bucket])
        torch._foreach_copy_(bucket, [part.view_as(g) for part, g in zip(parts, bucket)])


class GradSync:
    """Reduces a model's gradients and measures/clips their global norm."""

    def __init__(
        self, model: nn.Module, groups: ParallelGroups, bucket_mb: float = 25.0, dense_reduced: bool = False
    ) -> None:
        self.groups, self.dense_reduced = groups, dense_reduced
        self.bucket_bytes = int(bucket_mb * 2**20)
        params = [p for p in model.parameters() if p.requires_grad]
        self.dense = [p for p in params if not is_expert_param(p)]
        self.expert = [p for p in params if is_expert_param(p)]

    def _grads(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        # A parameter that got no gradient this step still takes part (as zeros): every rank
        # must pack identical buckets.
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in params]  # type: ignore[misc]

    def reduce(self) -> None:
        g = self.groups
        dense, expert = self._grads(self.dense), self._grads(self.expert)
        if not g.distributed:
            return
        if not self.dense_reduced:
            _all_reduce_mean(dense, g.world_group, g.world_size, self.bucket_bytes)
        if g.dp_size > 1:
            _all_reduce_mean(expert, g.expert_dp_group, g.world_size, self.bucket_bytes)
        elif expert:
            torch._foreach_div_(expert, float(g.world_size))

    def global_norm(self) -> torch.Tensor:
        """L2 norm of the whole gradient (all experts of all EP ranks once), same on every rank."""
        return global_grad_norm(self._grads(self.dense), self._grads(self.expert), self.groups)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so the global norm is <= ``max_norm`` (0 = no clipping); returns the norm."""
        norm = self.global_norm()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.dense + self.expert]
            if grads:
                torch._foreach_mul_(grads, scale)  # type: ignore[arg-type]
        return norm


def global_grad_norm(
    dense: list[torch.Tensor], expert: list[torch.Tensor], groups: ParallelGroups
) -> torch.Tensor:
    """``sqrt(dense_sq + sum_EP expert_sq)`` of reduced gradients (module docstring): the same
    value on every rank. Collective over the EP group when EP > 1."""
    dense_sq, expert_sq = _sq_norm(dense), _sq_norm(expert)
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    return (dense_sq + expert_sq).sqrt()


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()
