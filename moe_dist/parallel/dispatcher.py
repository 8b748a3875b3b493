"""All-to-all token dispatcher: dropless by default, optional per-expert capacity.

Shape legend: T tokens on this rank, H hidden size, K slots per token, S = T * K token-slots,
E experts (global), e local experts per EP rank, R EP ranks, X rows sent by this rank, Y rows
received by this rank (the experts' input, expert-major).

``dispatch(x_TH, routing) -> (expert_in_YH, tokens_per_local_expert_e, ctx)``:

1. Sort this rank's token-slots by global expert id (stable: token order inside an expert),
   leaving out unused (-1) slots and, with a capacity, the dropped ones
   (``permute.sort_slots`` states the drop policy).
2. Exchange per-expert counts with the EP group (all-to-all of counts), then copy both count
   tables to the host in one transfer: the uneven all-to-all needs its split sizes there. This
   is the only host synchronisation of a forward.
3. Gather the token rows of the kept slots (``x_TH[token of slot]``); with expert-sorted slots the
   rows are already grouped by destination EP rank.
4. All-to-all the rows; rank-major chunks arrive ((e0,r0),(e1,r0),(e0,r1),...) and are reordered
   to expert-major ((e0,r0),(e0,r1),(e1,r0),...) for the grouped GEMM.

``combine(expert_out_YH, ctx) -> y_TH`` is the exact inverse, then the weighted sum:

1. Reorder expert-major back to rank-major, all-to-all back to the source ranks.
2. Place every returned row at its slot in a zero ``[T, K, H]`` buffer (unique indices, so
   deterministic), and ``y_T = sum_k weights_TK[t, k] * buf[t, k]`` as one batched matmul.
   Gradients flow into the expert outputs and into ``weights_TK``; a dropped or unused slot
   holds zeros, so it adds nothing and its weight gets a zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_dist.parallel.all_to_all import all_to_all, exchange_counts, group_size
from moe_dist.parallel.permute import capacity_per_expert, rank_splits, sort_slots, transpose_chunks_index
from moe_dist.routing.base import Routing


@dataclass
class DispatchContext:
    """What ``combine`` needs to undo ``dispatch``."""

    num_tokens: int
    top_k: int
    slots_X: torch.Tensor  # slot ids of the rows sent, in send order
    weights_TK: torch.Tensor
    input_splits: list[int]  # rows sent to each EP rank
    output_splits: list[int]  # rows received from each EP rank
    to_rank_major_Y: torch.Tensor | None  # gather index expert-major -> rank-major (None: identity)
    dropped: int  # token-slots this rank dropped for capacity


class AllToAllDispatcher:
    """Moves token rows to the EP rank hosting their expert and back (see module docstring)."""

    def __init__(
        self,
        num_experts: int,
        ep_group: dist.ProcessGroup | None = None,
        capacity_factor: float | None = None,
    ) -> None:
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = group_size(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP size ({self.ep_size})")
        self.num_local_experts = num_experts // self.ep_size
        self.capacity_factor = capacity_factor

    def dispatch(
        self, x_TH: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        T, K = routing.experts_TK.shape
        E, R, e = self.num_experts, self.ep_size, self.num_local_experts
        capacity = None
        if self.capacity_factor is not None:
            capacity = capacity_per_expert(self.capacity_factor, T, K, E)
        # 1. slots sorted by global expert id; unused and dropped slots last.
        order_S, kept_counts_E = sort_slots(
            routing.experts_TK.reshape(-1), E, routing.weights_TK.reshape(-1), capacity
        )
        # 2. counts: what I send per expert, what each source sends to my local experts.
        recv_counts_Re = exchange_counts(kept_counts_E.reshape(R, e), self.ep_group)
        host = torch.cat(
            [kept_counts_E, recv_counts_Re.reshape(-1), (routing.experts_TK >= 0).sum().reshape(1)]
        )
        host_counts = host.tolist()  # the one host sync
        send_E, recv_Re, valid = host_counts[:E], host_counts[E : E + R * e], host_counts[-1]
        sent = sum(send_E)
        slots_X = order_S[:sent]
        # 3. rows of the kept slots, grouped by destination rank.
        x_XH = x_TH.index_select(0, torch.div(slots_X, K, rounding_mode="floor"))
        input_splits = rank_splits(send_E, R)
        output_splits = [sum(recv_Re[r * e : (r + 1) * e]) for r in range(R)]
        tokens_per_local_expert_e = torch.tensor(recv_Re, dtype=torch.int64).reshape(R, e).sum(0)
        # 4. exchange rows; reorder rank-major -> expert-major (a no-op with one rank or one expert).
        recv_YH = all_to_all(x_XH, output_splits, input_splits, self.ep_group)
        to_rank_major_Y = None
        if R > 1 and e > 1:
            counts_Re = recv_counts_Re.reshape(R, e)
            total = sum(output_splits)
            recv_YH = recv_YH.index_select(0, transpose_chunks_index(counts_Re, total))
            to_rank_major_Y = transpose_chunks_index(counts_Re.t(), total)
        ctx = DispatchContext(
            num_tokens=T,
            top_k=K,
            slots_X=slots_X,
            weights_TK=routing.weights_TK,
            input_splits=input_splits,
            output_splits=output_splits,
            to_rank_major_Y=to_rank_major_Y,
            dropped=valid - sent,
        )
        return recv_YH, tokens_per_local_expert_e, ctx

    def combine(self, expert_out_YH: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        # 1. expert-major -> rank-major, back to the source ranks.
        if ctx.to_rank_major_Y is not None:
            expert_out_YH = expert_out_YH.index_select(0, ctx.to_rank_major_Y)
        out_XH = all_to_all(expert_out_YH, ctx.input_splits, ctx.output_splits, self.ep_group)
        # 2. rows to their slots, then the weighted sum over each token's K slots.
        T, K, H = ctx.num_tokens, ctx.top_k, out_XH.shape[-1]
        # In place into a fresh zero buffer (no clone); autograd tracks it through out_XH.
        buf_SH = out_XH.new_zeros(T * K, H).index_copy_(0, ctx.slots_X, out_XH)
        w_T1K = ctx.weights_TK.to(out_XH.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, buf_SH.view(T, K, H)).squeeze(1)
