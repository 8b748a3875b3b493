"""MoELayer: router + balancing losses + all-to-all dispatcher + grouped experts (+ shared experts).

Shape legend: B batch, S sequence, T = B * S tokens on this rank, H hidden size, E experts
(global), e local experts (E / EP), K slots per token, Y rows this rank's experts receive.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from moe_dist.balancing.aux import aux_losses, loss_names
from moe_dist.balancing.base import BalancingLoss
from moe_dist.config import ConfigError, MoEConfig, validate_moe
from moe_dist.layers.experts import GroupedExperts, SharedExperts
from moe_dist.layers.layer_stats import register_stats, reset_stats
from moe_dist.parallel.dispatcher import AllToAllDispatcher
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.registry import LOSSES, ROUTERS
from moe_dist.routing.base import Router, RouterConfig


class MoELayer(nn.Module):
    """One expert-parallel MoE feed-forward layer.

    ``forward(x_BSH or x_TH) -> (y, aux)``:

    1. Route: ``routing = router(x_TH)`` (experts_TK, weights_TK, probs_TE, router-owned losses).
    2. Losses: ``Load`` from this rank's counts; when a loss ``needs_global_counts``, a copy of
       the counts (and T) is all-reduced over the whole DP x EP group, without gradient. ``aux``
       maps each loss's registry name (and each key of ``routing.losses``) to its
       coefficient-weighted scalar. Computed in train and eval mode alike.
    3. Experts' input is ``x_TH + routing.expert_input_delta_TH`` when the router sets a delta.
    4. Dispatch: sort slots by expert, all-to-all to the EP rank hosting each expert.
    5. Experts: one grouped GEMM chain over this rank's e local experts; each row's activation
       is scaled by its routing weight before the down projection.
    6. Combine: all-to-all back, sum of each token's K (already weighted) expert outputs.
    7. Shared experts (if any) see every token; their output is added.
    8. Statistics (training mode only, so eval leaves balancing state alone): token-slots per
       expert, rows received per local expert, dropped slots, the last aux values.

    ``layer.timing = True`` adds ``a2a_seconds`` (dispatch + combine, forward) and
    ``expert_seconds``, synchronising the device around each phase: measure, don't train, so.
    """

    def __init__(self, cfg: MoEConfig, hidden_size: int, groups: ParallelGroups | None = None) -> None:
        super().__init__()
        if not isinstance(cfg.router, RouterConfig):
            errors = validate_moe(cfg, hidden_size, prefix="moe")
            if errors or not isinstance(cfg.router, RouterConfig):
                raise ConfigError(errors or [f"moe.router: could not be validated, got {cfg.router!r}"])
        self.cfg = cfg
        self.groups = groups if groups is not None else ParallelGroups.single()
        E, ep = cfg.num_experts, self.groups.ep_size
        if E % ep:
            raise ConfigError(
                [f"moe.num_experts: must be divisible by the expert-parallel size ({ep}), got {E}"]
            )
        self.hidden_size, self.num_experts, self.num_local_experts = hidden_size, E, E // ep
        rcfg = cfg.router_cfg
        self.top_k = rcfg.top_k
        self.router: Router = ROUTERS.get(rcfg.name)(rcfg, hidden_size, E)
        self.losses: list[BalancingLoss] = [LOSSES.get(c.name)(c, E, rcfg.top_k) for c in cfg.losses]
        self.loss_names = loss_names(self.losses)
        ex = cfg.experts
        self.experts = GroupedExperts(
            self.num_local_experts,
            hidden_size,
            ex.ffn_hidden_size,
            activation=ex.activation,
            init_std=ex.init_std,
            num_experts=E,
            first_expert=self.groups.ep_rank * self.num_local_experts,
            cpu_matmul=ex.cpu_matmul,
            fused_kernels=cfg.fused_kernels,
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
            E, self.groups.ep_group, cfg.capacity_factor, self.groups.ep_shm, cfg.fused_kernels
        )
        register_stats(self, E, self.num_local_experts)
        self.last_aux: dict[str, torch.Tensor]  # set by register_stats; typed here

    def reset_stats(self) -> None:
        reset_stats(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoELayer: expected input [B, S, {self.hidden_size}] or [T, {self.hidden_size}], "
                f"got {list(x.shape)}"
            )
        B, S = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
        x_TH = x.reshape(-1, self.hidden_size)
        # 1. route
        routing = self.router(x_TH)
        counts_E = routing.counts_E()
        # 2. losses
        aux = self._aux_losses(routing, counts_E, B, S)
        # 3. experts' input
        xe_TH = x_TH if routing.expert_input_delta_TH is None else x_TH + routing.expert_input_delta_TH
        # 4-6. dispatch, experts, combine
        t0 = self._clock()
        expert_in_YH, tokens_per_expert_e, ctx = self.dispatcher.dispatch(xe_TH, routing)
        t1 = self._clock()
        expert_out_YH = self.experts(expert_in_YH, tokens_per_expert_e, ctx.row_weights_Y)
        t2 = self._clock()
        y_TH = self.dispatcher.combine(expert_out_YH, ctx)
        t3 = self._clock()
        # 7. shared experts
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(xe_TH)
        # 8. statistics
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E += counts_E.to(self.tokens_per_expert_E.device)
                self.received_per_local_expert_e += tokens_per_expert_e.to(self.received_per_local_expert_e)
                self.dropped_tokens += ctx.dropped
                self.last_aux = {k: v.detach() for k, v in aux.items()}
            if self.timing:
                self.a2a_seconds += (t1 - t0) + (t3 - t2)
                self.expert_seconds += t2 - t1
        return y_TH.view(x.shape), aux

    def _aux_losses(self, routing: Any, counts_E: torch.Tensor, B: int, S: int) -> dict[str, torch.Tensor]:
        world = self.groups.world_group
        return aux_losses(
            routing,
            counts_E,
            B,
            S,
            self.losses,
            self.loss_names,
            self.router,
            world,
            reduce_counts=world is not None,
        )

    def _clock(self) -> float:
        if not self.timing:
            return 0.0
        if self.experts.w1_eHF.device.type == "cuda":
            torch.cuda.synchronize(self.experts.w1_eHF.device)
        return time.perf_counter()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, local={self.num_local_experts}, top_k={self.top_k}"
