"""MoELayer: gate (router + balancing losses + load statistics) + all-to-all dispatcher + grouped experts.

Shape legend: B batch, S sequence, T = B * S tokens on this rank, H hidden size, E experts
(global), e local experts (E / EP), K slots per token, Y rows this rank's experts receive.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moe_dist.config import MoEConfig
from moe_dist.layers.experts import GroupedExperts, SharedExperts
from moe_dist.layers.gate import Gate
from moe_dist.ops.compute_dtype import compute_dtype
from moe_dist.parallel.dispatcher import AllToAllDispatcher
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.profile_ranges import named_range


class MoELayer(nn.Module):
    """One expert-parallel MoE feed-forward layer.

    ``forward(x_BSH or x_TH) -> (y, aux)``:

    1. Route and losses: ``routing, aux = gate(x_TH, B, S)`` (`Gate`: experts_TK, weights_TK,
       probs_TE; ``aux`` maps each loss's registry name, and each router-owned term, to its
       coefficient-weighted scalar; global counts over the whole DP x EP group when a loss
       ``needs_global_counts``). Computed in train and eval mode alike.
    2. Experts' input is ``x_TH + routing.expert_input_delta_TH`` when the router sets a delta,
       in the compute dtype (``ops/compute_dtype.py``: bf16 under bf16 autocast, so the rows
       cross the EP group in bf16 and the experts' GEMMs run in bf16).
    3. Dispatch: sort slots by expert, all-to-all to the EP rank hosting each expert.
    4. Experts: one grouped GEMM chain over this rank's e local experts; each row's activation
       is scaled by its routing weight before the down projection.
    5. Combine: all-to-all back, sum of each token's K (already weighted) expert outputs.
    6. Shared experts (if any) see every token; their output is added. The sum returns in the
       input's dtype (the residual stream's).
    7. Statistics (the gate's, training mode only, so eval leaves balancing state alone): the
       gate counted the token-slots per expert and kept the last aux values in 1; the layer
       reports the rows received per local expert and the dropped slots.

    ``layer.gate.timing = True`` adds ``a2a_seconds`` (dispatch + combine, forward) and
    ``expert_seconds`` to the gate's statistics, synchronising the device around each phase:
    measure, don't train, so.
    """

    def __init__(self, cfg: MoEConfig, hidden_size: int, groups: ParallelGroups | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.groups = groups if groups is not None else ParallelGroups.single()
        world = self.groups.world_group
        # model_scope: MoETransformer combines model-scope losses over its layers after each forward.
        self.gate = Gate(
            cfg,
            hidden_size,
            ep_size=self.groups.ep_size,
            counts_group=world,
            reduce_counts=world is not None,
            model_scope=True,
        )
        self.hidden_size, self.num_experts = hidden_size, cfg.num_experts
        self.num_local_experts = self.gate.num_local_experts
        ex = cfg.experts
        self.experts = GroupedExperts(
            self.num_local_experts,
            hidden_size,
            ex.ffn_hidden_size,
            activation=ex.activation,
            init_std=ex.init_std,
            num_experts=self.num_experts,
            first_expert=self.groups.ep_rank * self.num_local_experts,
            cpu_matmul=ex.cpu_matmul,
            fused_kernels=cfg.fused_kernels,
            backend=ex.backend,
        )
        self.shared_experts: SharedExperts | None = None
        if cfg.shared_experts.count > 0:
            self.shared_experts = SharedExperts(
                cfg.shared_experts.count,
                hidden_size,
                cfg.shared_experts.ffn_hidden_size,
                init_std=ex.init_std,
            )
        self.dispatcher = AllToAllDispatcher(
            self.num_experts, self.groups.ep_group, cfg.capacity_factor, self.groups.ep_shm, cfg.fused_kernels
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoELayer: expected input [B, S, {self.hidden_size}] or [T, {self.hidden_size}], "
                f"got {list(x.shape)}"
            )
        B, S = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        x_TH = x.reshape(-1, self.hidden_size)
        # 1. route, losses
        with named_range("router"):
            routing, aux = self.gate(x_TH, B, S)
        # 2. experts' input, in the compute dtype
        xe_TH = x_TH if routing.expert_input_delta_TH is None else x_TH + routing.expert_input_delta_TH
        xe_TH = xe_TH.to(compute_dtype(xe_TH))
        # 3-5. dispatch, experts, combine
        t0 = self._clock()
        with named_range("dispatch"):
            expert_in_YH, tokens_per_expert_e, ctx = self.dispatcher.dispatch(xe_TH, routing)
        t1 = self._clock()
        with named_range("experts"):
            expert_out_YH = self.experts(expert_in_YH, tokens_per_expert_e, ctx.row_weights_Y)
        t2 = self._clock()
        with named_range("combine"):
            y_TH = self.dispatcher.combine(expert_out_YH, ctx)
        t3 = self._clock()
        # 6. shared experts
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(xe_TH)
        # 7. statistics
        self.gate.record_received(tokens_per_expert_e, ctx.dropped, (t1 - t0) + (t3 - t2), t2 - t1)
        return y_TH.view(x.shape).to(x.dtype), aux

    def _clock(self) -> float:
        if not self.gate.timing:
            return 0.0
        if self.experts.w1_eHF.device.type == "cuda":
            torch.cuda.synchronize(self.experts.w1_eHF.device)
        return time.perf_counter()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, local={self.num_local_experts}"
