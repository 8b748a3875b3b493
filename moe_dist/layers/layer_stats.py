"""The per-step statistics a MoE layer keeps for ``finish_step`` and telemetry.

Shape legend: E experts (global), e local experts (E / EP).

``MoELayer`` and ``PluginRouting`` (the DeepSpeed / Megatron adapters) keep the same ones:
``tokens_per_expert_E`` (slots per expert before drops), ``received_per_local_expert_e`` (rows
this rank's experts received), ``dropped_tokens``, ``last_aux`` and, when ``timing``,
``a2a_seconds`` / ``expert_seconds``.
"""

from __future__ import annotations

import torch
from torch import nn


def register_stats(module: nn.Module, num_experts: int, num_local_experts: int) -> None:
    """Zeroed statistics on ``module``; non-persistent buffers: per-step scratch, and [e] depends on EP."""
    module.register_buffer("tokens_per_expert_E", torch.zeros(num_experts), persistent=False)
    module.register_buffer("received_per_local_expert_e", torch.zeros(num_local_experts), persistent=False)
    module.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
    module.last_aux = {}
    module.timing = False
    module.a2a_seconds = 0.0
    module.expert_seconds = 0.0


@torch.no_grad()
def reset_stats(module: nn.Module) -> None:
    """Zero what ``register_stats`` set up (``last_aux`` and ``timing`` stay)."""
    module.tokens_per_expert_E.zero_()
    module.received_per_local_expert_e.zero_()
    module.dropped_tokens.zero_()
    module.a2a_seconds = 0.0
    module.expert_seconds = 0.0
