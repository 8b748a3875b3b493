"""All-to-all token dispatcher: dropless by default, optional per-expert capacity.

Shape legend: T tokens on this rank, H hidden size, K slots per token, S = T * K token-slots,
E experts (global), e local experts per EP rank, R EP ranks, X rows sent by this rank, Y rows
received by this rank (the experts' input, expert-major).

``dispatch(x_TH, routing) -> (expert_in_YH, tokens_per_local_expert_e, ctx)``, with
``ctx.row_weights_Y`` the routing weight of every received row (the experts apply it to their
activation, so the combine is a plain sum and keeps nothing for its backward):

1. Sort this rank's token-slots by global expert id (stable: token order inside an expert),
   leaving out unused (-1) slots and, with a capacity, the dropped ones
   (``permute.sort_slots`` states the drop policy).
2. Exchange per-expert counts with the EP group (all-to-all of counts), then copy both count
   tables to the host in one transfer: the uneven all-to-all needs its split sizes there. This
   is the only host synchronisation of a forward, and it is skipped on one EP rank without a
   capacity when the router uses every slot (``Routing.every_slot_used``): then all rows stay.
3. Gather the token rows of the kept slots (``x_TH[token of slot]``, ``token_rows.py``: its
   backward sums each token's slot gradients in a fixed order, no atomics); with expert-sorted
   slots the rows are already grouped by destination EP rank.
4. Exchange the rows (``chunk_exchange``: one chunk per global expert out, and in, expert-major
   ((e0,r0),(e0,r1),(e1,r0),...) for the grouped GEMM). Through shared memory when the EP group
   is one host's gloo ranks, else one all-to-all plus a reorder. The rows' routing weights take
   the same path (one more small exchange, the gather folded into it).

``combine(expert_out_YH, ctx) -> y_TH`` is the exact inverse, then the sum over the K slots:

1. Exchange with the reversed plan: every row returns to its source rank.
2. Every returned row lands at its slot of a ``[T, K, H]`` buffer as it is copied in (the
   exchange's ``recv_index``; unique indices, so deterministic), and ``y_T = sum_k buf[t, k]``.
   The rows already carry their routing weight (the experts applied ``ctx.row_weights_Y``), so
   the weights' gradients come from the experts' backward; a dropped or unused slot holds zeros
   (it adds nothing, and its weight was never sent, so its gradient is zero).

Every exchange is a permutation (or a placement), so its backward is the inverse move, a row
gather folded into the reversed exchange's copies. The token gather of step 3 and the sum over
K are each other's adjoints (``token_rows.py``): on GPUs neither backward adds atomically (on
CPU the gather's backward is a sequential ``index_add_``). On one EP rank without drops the
placement and sum is ``token_rows.sum_slot_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from moe_dist.ops.compiled import FusedKernels
from moe_dist.ops.slot_sort import capacity_per_expert, sort_slots
from moe_dist.ops.token_rows import gather_token_rows, sum_slot_rows
from moe_dist.parallel.all_to_all import exchange_counts, group_size
from moe_dist.parallel.chunk_exchange import exchange_chunks
from moe_dist.parallel.chunk_plan import ChunkPlan
from moe_dist.parallel.shm_transport import ShmTransport
from moe_dist.profile_ranges import named_range
from moe_dist.routing.base import Routing


@dataclass
class DispatchContext:
    """What ``combine`` needs to undo ``dispatch``."""

    num_tokens: int
    top_k: int
    slots_X: torch.Tensor  # slot ids of the rows sent, in send order
    row_weights_Y: torch.Tensor  # routing weight of every received row (differentiable)
    plan: ChunkPlan | None  # how the rows went out (combine sends them back along plan.reverse())
    dropped: int  # token-slots this rank dropped for capacity


class AllToAllDispatcher:
    """Moves token rows to the EP rank hosting their expert and back (see module docstring)."""

    def __init__(
        self,
        num_experts: int,
        ep_group: dist.ProcessGroup | None = None,
        capacity_factor: float | None = None,
        shm: ShmTransport | None = None,
        fused_kernels: FusedKernels = "auto",
    ) -> None:
        self.num_experts = num_experts
        self.ep_group, self.shm = ep_group, shm
        self.ep_size = group_size(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the EP size ({self.ep_size})")
        self.num_local_experts = num_experts // self.ep_size
        self.capacity_factor = capacity_factor
        self.fused_kernels: FusedKernels = fused_kernels

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
        if R == 1 and capacity is None and routing.every_slot_used:
            # Every slot's row stays here: nothing to exchange, so nothing needs the counts on
            # the host (no device synchronisation; the grouped GEMM reads them on the device).
            x_SH = gather_token_rows(x_TH, order_S, K, self.fused_kernels)
            w_S = routing.weights_TK.reshape(-1).index_select(0, order_S)
            ctx = DispatchContext(T, K, order_S, w_S, plan=None, dropped=0)
            return x_SH, kept_counts_E, ctx
        # 2. counts: what I send per expert, what each source sends to my local experts.
        recv_counts_Re = exchange_counts(kept_counts_E.reshape(R, e), self.ep_group)
        host = torch.cat(
            [kept_counts_E, recv_counts_Re.reshape(-1), (routing.experts_TK >= 0).sum().reshape(1)]
        )
        host_counts = host.tolist()  # the one host sync
        send_E, recv_Re, valid = host_counts[:E], host_counts[E : E + R * e], host_counts[-1]
        sent = sum(send_E)
        slots_X = order_S[:sent]
        # 3. rows of the kept slots, one chunk per global expert (so grouped by destination rank).
        x_XH = gather_token_rows(x_TH, slots_X, K, self.fused_kernels)
        plan = ChunkPlan(
            send=tuple((g // e, send_E[g]) for g in range(E)),
            # expert-major: local expert i's chunk from every source rank, source order
            recv=tuple((r, recv_Re[r * e + i]) for i in range(e) for r in range(R)),
        )
        tokens_per_local_expert_e = torch.tensor(recv_Re, dtype=torch.int64).reshape(R, e).sum(0)
        # 4. exchange rows, and their routing weights; they arrive expert-major.
        weights_plan = replace(plan, send_index=slots_X, in_rows=T * K)
        with named_range("all_to_all"):
            recv_YH = exchange_chunks(x_XH, plan, self.ep_group, self.shm)
            w_Y = exchange_chunks(routing.weights_TK.reshape(-1), weights_plan, self.ep_group, self.shm)
        ctx = DispatchContext(
            num_tokens=T,
            top_k=K,
            slots_X=slots_X,
            row_weights_Y=w_Y,
            plan=plan,
            dropped=valid - sent,
        )
        return recv_YH, tokens_per_local_expert_e, ctx

    def combine(self, expert_out_YH: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        # 1. back to the source ranks, each row straight to its slot of a [T * K, H] buffer
        #    (zero where a slot sent nothing); 2. the sum over each token's K slots (the rows
        #    carry their routing weights already).
        T, K, H = ctx.num_tokens, ctx.top_k, expert_out_YH.shape[-1]
        if ctx.plan is not None:
            back = replace(ctx.plan.reverse(), recv_index=ctx.slots_X, out_rows=T * K)
            with named_range("all_to_all"):
                buf_SH = exchange_chunks(expert_out_YH, back, self.ep_group, self.shm)
            return buf_SH.view(T, K, H).sum(1)
        # every slot stayed here: place and sum without an exchange
        return sum_slot_rows(expert_out_YH, ctx.slots_X, T, K, self.fused_kernels)
