"""The once-per-optimizer-step hook: global expert load of every MoE layer, router updates, reset.

Shape legend: L MoE layers, E experts (global).

``finish_step(layers, groups)``, called by the trainer after ``optimizer.step()``:

1. Stack every layer's ``tokens_per_expert_E`` (summed over the step's micro-batches, counted
   once per forward in training mode) into ``[L, E]``.
2. All-reduce that stack over the whole DP x EP group: ONE collective for all layers.
3. ``layer.router.after_step(global_counts_E)`` for each layer: every rank sees the same counts,
   so non-gradient router state (aux-loss-free bias, EMA keys) stays identical on all ranks.
4. Reset each layer's statistics; return the global counts per layer (metrics, telemetry).

The same collective also carries, for telemetry, the tokens each expert actually received
(after capacity drops) and the dropped slots: the result is a `StepCounts`, a plain list of the
global counts with those (and this rank's timings, read before the reset) as attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moe_dist.parallel.groups import ParallelGroups

if TYPE_CHECKING:
    from moe_dist.layers.moe_layer import MoELayer


class StepCounts(list):
    """``finish_step``'s result: the global counts per layer (a list, as before), plus what telemetry
    needs from before the reset: ``received_E`` (per layer, tokens each expert received after
    drops, summed over the group), ``dropped`` (per layer, summed over the group),
    ``local_received`` (per layer, this rank's experts only), ``a2a_seconds`` and
    ``expert_seconds`` (this rank, all layers)."""

    received_E: list[torch.Tensor]  # noqa: N815 - shape suffix
    dropped: list[torch.Tensor]
    local_received: list[torch.Tensor]
    a2a_seconds: float = 0.0
    expert_seconds: float = 0.0


@torch.no_grad()
def finish_step(layers: list[MoELayer], groups: ParallelGroups) -> list[torch.Tensor]:
    if not layers:
        return []
    L, E = len(layers), layers[0].tokens_per_expert_E.numel()
    counts_LE = torch.stack([layer.tokens_per_expert_E for layer in layers])
    # Received counts go to their global expert ids (zeros elsewhere), so the same sum over the
    # group adds up each expert's data-parallel replicas.
    received_LE = counts_LE.new_zeros(L, E)
    for i, layer in enumerate(layers):
        e = layer.received_per_local_expert_e.numel()
        received_LE[i, groups.ep_rank * e : (groups.ep_rank + 1) * e] = layer.received_per_local_expert_e
    dropped_L1 = torch.stack([layer.dropped_tokens.to(counts_LE) for layer in layers]).reshape(L, 1)
    packed_LX = torch.cat([counts_LE, received_LE, dropped_L1], dim=1)
    if groups.world_group is not None and groups.world_size > 1 and dist.is_initialized():
        dist.all_reduce(packed_LX, group=groups.world_group)
    global_counts = StepCounts(packed_LX[:, :E].unbind(0))
    global_counts.received_E = list(packed_LX[:, E : 2 * E].unbind(0))
    global_counts.dropped = list(packed_LX[:, 2 * E].unbind(0))
    global_counts.local_received = [layer.received_per_local_expert_e.sum() for layer in layers]
    global_counts.a2a_seconds = sum(float(layer.a2a_seconds) for layer in layers)
    global_counts.expert_seconds = sum(float(layer.expert_seconds) for layer in layers)
    for layer, counts_E in zip(layers, global_counts):
        layer.router.after_step(counts_E)
        layer.reset_stats()
    return global_counts
