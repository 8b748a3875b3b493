"""Differentiable exchange of row chunks between the ranks of a group, in any order on both sides.

Shape legend: X rows this rank sends, Y rows it receives, H row width (hidden size), R ranks.

A ``ChunkPlan`` (``chunk_plan.py``, with the index maths) says where each chunk of the input goes
and in which order the received chunks are laid out. The token dispatcher sends one chunk per
global expert (expert-sorted, so grouped by destination rank) and wants the received rows
**expert-major**, ``(e0,r0) (e0,r1) (e1,r0) ...``; the combine is the same plan reversed. The
backward of an exchange is the reversed exchange: gradient rows travel back along the same chunks.

Two transports move the rows:

* ``collective`` (any backend): chunks grouped by destination (a no-op for the dispatcher), one
  ``all_to_all_single``, then the received source-major chunks reordered into the plan's order
  (one copy; skipped when the order already is source-major).
* ``ShmTransport`` (gloo, every rank of the group on this host; ``shm_transport.py``): each rank
  copies its outgoing chunks into its shared-memory outbox, one barrier, each rank copies its
  incoming chunks straight into place. No sockets, no reorder pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from moe_dist.parallel.all_to_all import group_size
from moe_dist.parallel.chunk_plan import ChunkPlan, arrival_order, peer_major_order, rows_per_peer

if TYPE_CHECKING:
    from moe_dist.parallel.shm_transport import ShmTransport


def _reorder(buf_NH: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """The chunks of ``buf_NH`` (``sizes`` rows each) in ``order``; ``buf_NH`` itself when the
    order is the identity (no copy)."""
    if order == list(range(len(order))):
        return buf_NH
    chunks = torch.split(buf_NH, sizes)
    return torch.cat([chunks[i] for i in order])


def collective_move(x_XH: torch.Tensor, plan: ChunkPlan, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The exchange through ``all_to_all_single`` (no autograd)."""
    R = group_size(group)
    if plan.send_index is not None:
        x_XH = x_XH.index_select(0, plan.send_index)
    send_XH = _reorder(x_XH, [n for _, n in plan.send], peer_major_order(plan.send))
    input_splits, output_splits = rows_per_peer(plan.send, R), rows_per_peer(plan.recv, R)
    if R == 1:
        recv_YH = send_XH
    else:
        recv_YH = x_XH.new_empty((sum(output_splits), *x_XH.shape[1:]))
        dist.all_to_all_single(
            recv_YH,
            send_XH.contiguous(),
            output_split_sizes=output_splits,
            input_split_sizes=input_splits,
            group=group,
        )
    # recv_YH is source-major, each source's chunks in its send order; put them in plan order.
    sizes = [plan.recv[j][1] for j in peer_major_order(plan.recv)]
    return plan.place(_reorder(recv_YH, sizes, arrival_order(plan.recv)))


def _move(
    x_XH: torch.Tensor, plan: ChunkPlan, group: dist.ProcessGroup | None, shm: ShmTransport | None
) -> torch.Tensor:
    if shm is not None:
        return shm.move(x_XH, plan)
    return collective_move(x_XH, plan, group)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_XH: torch.Tensor,
        plan: ChunkPlan,
        group: dist.ProcessGroup | None,
        shm: ShmTransport | None,
    ) -> torch.Tensor:
        ctx.plan, ctx.group, ctx.shm = plan, group, shm
        y_YH = _move(x_XH, plan, group, shm)
        return y_YH.view_as(y_YH) if y_YH is x_XH else y_YH  # an output may not be its input

    @staticmethod
    def backward(ctx: Any, grad_YH: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return _move(grad_YH.contiguous(), ctx.plan.reverse(), ctx.group, ctx.shm), None, None, None


def exchange_chunks(
    x_XH: torch.Tensor,
    plan: ChunkPlan,
    group: dist.ProcessGroup | None,
    shm: ShmTransport | None = None,
) -> torch.Tensor:
    """Send the chunks of ``x_XH`` per ``plan.send``; return the received chunks in ``plan.recv``
    order. Collective: every rank of ``group`` calls it, with matching plans. Differentiable."""
    if plan.input_rows != x_XH.shape[0]:
        raise ValueError(
            f"exchange_chunks: plan takes {plan.input_rows} input rows, tensor has {x_XH.shape[0]}"
        )
    return _Exchange.apply(x_XH, plan, group, shm)
