"""`PluginRouting`: one moe_dist router + its balancing losses + the telemetry buffers, for any MoE stack.

Shape legend: T tokens on this rank, H hidden size, E experts (global), e local experts, K slots
per token, B batch, S sequence.

Both adapters (the DeepSpeed gate and the Megatron-Core router) own one of these, so the maths
and the statistics are the native ``MoELayer``'s by construction:

``forward(x_TH, batch_size, seq_len, sequence_first) -> (routing, aux)``

1. When the foreign stack hands tokens sequence-first (Megatron's ``[S, B, H]``), reorder them
   batch-first so that sequence-wise losses see each sequence contiguously, as in ``MoELayer``.
2. ``routing = router(x_TH)``; ``Load`` from this rank's counts; when a loss
   ``needs_global_counts`` the counts (and T) are all-reduced over ``counts_group`` (the DP x EP
   group) without gradient.
3. ``aux`` maps each loss's registry name (and each key of ``routing.losses``) to its
   coefficient-weighted scalar, exactly like ``MoELayer``.
4. Reorder the routing back to the caller's token order.
5. Statistics in training mode: ``tokens_per_expert_E`` (slots per expert before drops) and
   ``last_aux``; the adapter adds ``kept_per_expert_E`` / ``dropped_tokens`` after its capacity step.

The object quacks like a ``MoELayer`` for telemetry and for `after_step` (``finish_step``): ``router``,
``tokens_per_expert_E``, ``received_per_local_expert_e``, ``dropped_tokens``, ``last_aux``,
``a2a_seconds``/``expert_seconds`` (0: the foreign stack does the communication), ``reset_stats()``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.balancing.aux import aux_losses, loss_names
from moe_dist.balancing.base import BalancingLoss
from moe_dist.config import ConfigError, MoEConfig, validate_moe
from moe_dist.layers.layer_stats import register_stats, reset_stats
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.registry import LOSSES, ROUTERS
from moe_dist.routing.base import Router, RouterConfig, Routing
from moe_dist.training.step_hook import finish_step


class PluginRouting(nn.Module):
    """A registered router and losses with ``MoELayer``'s statistics (see the module docstring)."""

    def __init__(
        self,
        cfg: MoEConfig,
        hidden_size: int,
        ep_size: int = 1,
        counts_group: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg.router, RouterConfig):
            errors = validate_moe(cfg, hidden_size, prefix="moe")
            if errors:
                raise ConfigError(errors)
        E = cfg.num_experts
        if E % ep_size:
            raise ConfigError(
                [f"moe.num_experts: must be divisible by the expert-parallel size ({ep_size}), got {E}"]
            )
        self.cfg = cfg
        self.hidden_size, self.num_experts = hidden_size, E
        self.ep_size, self.num_local_experts = ep_size, E // ep_size
        rcfg = cfg.router_cfg
        self.top_k = rcfg.top_k
        self.router: Router = ROUTERS.get(rcfg.name)(rcfg, hidden_size, E)
        self.losses: list[BalancingLoss] = [LOSSES.get(c.name)(c, E, rcfg.top_k) for c in cfg.losses]
        self.loss_names = loss_names(self.losses)
        # The DP x EP group for global counts (None: the default group when initialised).
        self.counts_group = counts_group
        register_stats(self, E, self.num_local_experts)
        self.last_aux: dict[str, torch.Tensor]  # set by register_stats; typed here
        self.register_buffer("kept_per_expert_E", torch.zeros(E), persistent=False)

    @property
    def weight_EH(self) -> torch.Tensor | None:
        return self.router.weight_EH

    @torch.no_grad()
    def reset_stats(self) -> None:
        reset_stats(self)
        self.kept_per_expert_E.zero_()

    def forward(
        self, x_TH: torch.Tensor, batch_size: int, seq_len: int, sequence_first: bool = False
    ) -> tuple[Routing, dict[str, torch.Tensor]]:
        T = x_TH.shape[0]
        if batch_size * seq_len != T:
            raise ValueError(
                f"PluginRouting: batch_size * seq_len ({batch_size} * {seq_len}) != tokens ({T})"
            )
        # 1. batch-first order for the router and losses
        order_T = None
        if sequence_first and batch_size > 1 and seq_len > 1:
            order_T = torch.arange(T, device=x_TH.device).view(seq_len, batch_size).t().reshape(-1)
            x_TH = x_TH.index_select(0, order_T)
        # 2-3. route, losses
        routing = self.router(x_TH)
        counts_E = routing.counts_E()
        aux = self._aux_losses(routing, counts_E, batch_size, seq_len)
        # 4. back to the caller's order
        if order_T is not None:
            routing = _reorder(routing, torch.argsort(order_T))
        # 5. statistics
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E += counts_E.to(self.tokens_per_expert_E.device)
                self.last_aux = {k: v.detach() for k, v in aux.items()}
        return routing, aux

    @torch.no_grad()
    def record_kept(self, kept_counts_E: torch.Tensor, dropped: torch.Tensor | int) -> None:
        """Slots per expert that survived the capacity step, and how many were dropped (training only)."""
        if self.training:
            self.kept_per_expert_E += kept_counts_E.to(self.kept_per_expert_E)
            self.dropped_tokens += torch.as_tensor(dropped, dtype=torch.float32).to(
                self.dropped_tokens.device
            )

    def _aux_losses(
        self, routing: Routing, counts_E: torch.Tensor, B: int, S: int
    ) -> dict[str, torch.Tensor]:
        """``MoELayer._aux_losses``: the same function, global counts over ``counts_group``."""
        return aux_losses(
            routing, counts_E, B, S, self.losses, self.loss_names, self.router, self.counts_group
        )

    def extra_repr(self) -> str:
        return f"router={self.router.registry_name}, losses={self.loss_names}, experts={self.num_experts}"


def _reorder(routing: Routing, index_T: torch.Tensor) -> Routing:
    """The same routing with its token rows gathered by ``index_T``."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, index_T)

    return replace(
        routing,
        experts_TK=pick(routing.experts_TK),
        weights_TK=pick(routing.weights_TK),
        probs_TE=pick(routing.probs_TE),
        logits_TE=pick(routing.logits_TE),
        expert_input_delta_TH=pick(routing.expert_input_delta_TH),
    )


def stats_modules(model: nn.Module) -> list[PluginRouting]:
    """Every `PluginRouting` in ``model``, in module order: what telemetry and `after_step` take."""
    return [m for m in model.modules() if isinstance(m, PluginRouting)]


@torch.no_grad()
def after_step(layers: list[PluginRouting], groups: ParallelGroups) -> list[torch.Tensor]:
    """Once per optimizer step, after ``optimizer.step()``: ``step_hook.finish_step`` for adapters.

    1. ``received_per_local_expert_e`` = the kept slots of this rank's experts summed over its EP
       group: ONE all-reduce of every layer's ``kept_per_expert_E`` over ``groups.ep_group`` (the
       foreign dispatcher does not report what each rank received).
    2. ``finish_step``: ONE all-reduce of counts / received / dropped over the DP x EP group,
       ``router.after_step(global_counts_E)``, reset of the statistics.

    Returns ``finish_step``'s global per-expert counts (what ``Telemetry.on_step`` takes).
    """
    if not layers:
        return []
    kept_LE = torch.stack([m.kept_per_expert_E for m in layers])
    if groups.ep_group is not None and groups.ep_size > 1 and dist.is_initialized():
        dist.all_reduce(kept_LE, group=groups.ep_group)
    for m, kept_E in zip(layers, kept_LE):
        e = m.received_per_local_expert_e.numel()
        m.received_per_local_expert_e.copy_(kept_E[groups.ep_rank * e : (groups.ep_rank + 1) * e])
    return finish_step(layers, groups)  # type: ignore[arg-type]
