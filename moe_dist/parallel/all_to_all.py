"""Differentiable all-to-all with uneven splits (gloo and NCCL), and the count exchange before it.

Shape legend: X rows this rank sends, Y rows it receives, H hidden size, R ranks in the group.

The receiver must know how many rows each peer sends before the payload moves, so a dispatch is
two collectives: ``exchange_counts`` (an all-to-all of per-destination counts, equal splits),
then ``all_to_all`` of the rows with the now-known uneven splits. The backward of ``all_to_all``
is the same collective with the splits swapped: gradient rows travel back to the rank whose
rows produced them. On a group of size 1 (or no group) both are the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def exchange_counts(send_counts_RC: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``recv[r, c]`` = what rank r put in its ``send[me, c]``: per-destination counts swapped.

    ``send_counts_RC`` has one row per destination rank (C counts each, e.g. one per local
    expert); the result has one row per source rank. No gradient.
    """
    if group_size(group) == 1:
        return send_counts_RC.clone()
    send = send_counts_RC.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_XH: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x_XH, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad_YH: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return _all_to_all(grad_YH, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _all_to_all(
    x_XH: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    y_YH = x_XH.new_empty((sum(output_splits), *x_XH.shape[1:]))
    dist.all_to_all_single(
        y_YH, x_XH.contiguous(), output_split_sizes=output_splits, input_split_sizes=input_splits, group=group
    )
    return y_YH


def all_to_all(
    x_XH: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Send ``input_splits[r]`` consecutive rows of ``x_XH`` to rank r; receive ``output_splits[r]``
    rows from rank r, concatenated in rank order. Differentiable; identity on a group of one."""
    if group_size(group) == 1:
        return x_XH
    if sum(input_splits) != x_XH.shape[0]:
        raise ValueError(
            f"all_to_all: input splits sum to {sum(input_splits)}, tensor has {x_XH.shape[0]} rows"
        )
    return _AllToAll.apply(x_XH, output_splits, input_splits, group)
