"""The once-per-optimizer-step hook: global expert load of every MoE layer, router updates, reset.

Shape legend: L MoE layers, E experts (global), e local experts (E / EP).

``finish_step(layers, groups)``, called by the trainer after ``optimizer.step()``, reads every
layer's `Gate` (``layer.gate``: our ``MoELayer``, the DeepSpeed and Megatron adapters alike):

1. Gates whose dispatcher is not ours (``kept_per_expert_E``: DeepSpeed, Megatron) report kept
   slots per global expert; ONE all-reduce of those ``[L', E]`` over the EP group gives each
   rank what its own experts received, written to ``received_per_local_expert_e``.
2. Stack every gate's ``tokens_per_expert_E`` (summed over the step's micro-batches, counted
   once per forward in training mode) into ``[L, E]``, next to the received counts (at their
   global expert ids, zeros elsewhere) and the dropped slots.
3. All-reduce that stack over the whole DP x EP group: ONE collective for all layers.
4. ``gate.router.after_step(global_counts_E)`` for each layer: every rank sees the same counts,
   so non-gradient router state (aux-loss-free bias, EMA keys) stays identical on all ranks.
5. Reset each gate's statistics; return a `StepCounts` (metrics, telemetry), with this rank's
   timings read before the reset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_dist.layers.gate import Gate, HasGate
from moe_dist.parallel.groups import ParallelGroups


@dataclass
class StepCounts:
    """``finish_step``'s result, one entry per layer (device tensors unless noted)."""

    counts_E: list[torch.Tensor]  # noqa: N815 - routed token-slots per expert, summed over the group
    received_E: list[torch.Tensor]  # noqa: N815 - received after drops, summed over the group
    dropped: list[torch.Tensor]  # scalar slots dropped for capacity, summed over the group
    local_received: list[torch.Tensor]  # scalar tokens THIS rank's experts received
    a2a_seconds: float = 0.0  # host floats, this rank, all layers
    expert_seconds: float = 0.0


def _kept_to_received(layers: Sequence[HasGate], groups: ParallelGroups) -> None:
    """Step 1: the kept counts of foreign dispatchers, summed over EP, sliced to this rank's experts."""
    gates = [layer.gate for layer in layers if layer.gate.kept_per_expert_E is not None]
    if not gates:
        return
    kept_LE = torch.stack([g.kept_per_expert_E for g in gates])  # type: ignore[misc]
    if groups.ep_group is not None and groups.ep_size > 1 and dist.is_initialized():
        dist.all_reduce(kept_LE, group=groups.ep_group)
    for g, kept_E in zip(gates, kept_LE):
        e = g.received_per_local_expert_e.numel()
        g.received_per_local_expert_e.copy_(kept_E[groups.ep_rank * e : (groups.ep_rank + 1) * e])


@torch.no_grad()
def finish_step(layers: Sequence[HasGate], groups: ParallelGroups) -> StepCounts:
    if not layers:
        return StepCounts([], [], [], [])
    # 1. foreign dispatchers' kept counts -> received
    _kept_to_received(layers, groups)
    # 2. one stack
    gates = [layer.gate for layer in layers]
    L, E = len(gates), gates[0].tokens_per_expert_E.numel()
    counts_LE = torch.stack([g.tokens_per_expert_E for g in gates])
    # Received counts go to their global expert ids (zeros elsewhere), so the same sum over the
    # group adds up each expert's data-parallel replicas.
    received_Le = torch.stack([g.received_per_local_expert_e for g in gates])
    e = received_Le.shape[1]
    received_LE = counts_LE.new_zeros(L, E)
    received_LE[:, groups.ep_rank * e : (groups.ep_rank + 1) * e] = received_Le
    dropped_L1 = torch.stack([g.dropped_tokens.to(counts_LE) for g in gates]).reshape(L, 1)
    packed_LX = torch.cat([counts_LE, received_LE, dropped_L1], dim=1)
    # 3. one all-reduce
    if groups.world_group is not None and groups.world_size > 1 and dist.is_initialized():
        dist.all_reduce(packed_LX, group=groups.world_group)
    result = StepCounts(
        counts_E=list(packed_LX[:, :E].unbind(0)),
        received_E=list(packed_LX[:, E : 2 * E].unbind(0)),
        dropped=list(packed_LX[:, 2 * E].unbind(0)),
        local_received=list(received_Le.sum(dim=1).unbind(0)),
        a2a_seconds=sum(float(g.a2a_seconds) for g in gates),
        expert_seconds=sum(float(g.expert_seconds) for g in gates),
    )
    # 4. router updates; 5. reset, all gates at once
    for g, counts_E in zip(gates, result.counts_E):
        g.router.after_step(counts_E)
    Gate.reset_all(gates)
    return result
