"""The count exchange before a token exchange, and the group-size helper.

Shape legend: R ranks in the group, C counts per destination.

The receiver must know how many rows each peer sends before the payload moves, so a dispatch is
two steps: ``exchange_counts`` (an all-to-all of per-destination counts, equal splits), then
``chunk_exchange.exchange_chunks`` of the rows with the now-known uneven sizes. On a group of
size 1 (or no group) the exchange is the identity.
"""

from __future__ import annotations

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
