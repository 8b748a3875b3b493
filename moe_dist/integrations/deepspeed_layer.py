"""`DeepSpeedMoELayer`: a DeepSpeed ``MoE`` (with `MoeDistGate`) in the place of a native ``MoELayer``.

Why DeepSpeed ``MoE`` layers and not our ``MoELayer`` with marked expert parameters: the engine
treats a model as MoE only when it contains ``deepspeed.moe.layer.MoE`` modules
(``has_moe_layers``); only then does it create the expert-parallel groups, reduce expert
gradients over the expert-data-parallel group and keep ZeRO's MoE parameter groups apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_dist.integrations import deepspeed_checkpoint
from moe_dist.integrations.deepspeed_moe import MoeDistDeepSpeedMoE, build_deepspeed_moe, copy_from_native
from moe_dist.integrations.plugin_routing import PluginRouting
from moe_dist.layers.moe_layer import MoELayer


class DeepSpeedMoELayer(MoELayer):
    """A DeepSpeed ``MoE`` that the model, trainer and telemetry address as a ``MoELayer``.

    ``forward(x_BSH) -> (y_BSH, aux)`` like ``MoELayer`` (aux: weighted terms by name); the
    statistics (``tokens_per_expert_E``, ``dropped_tokens``, ``last_aux``, ...) are the gate's
    `PluginRouting` buffers. ``MoELayer.__init__`` is not run: nothing of the native dispatch exists.
    """

    def __init__(self, native: MoELayer, ep_size: int) -> None:
        nn.Module.__init__(self)
        self.cfg = native.cfg
        self.hidden_size, self.num_experts = native.hidden_size, native.num_experts
        self.num_local_experts, self.top_k = native.num_local_experts, native.top_k
        self.moe: MoeDistDeepSpeedMoE = build_deepspeed_moe(native.cfg, native.hidden_size, ep_size=ep_size)
        copy_from_native(self.moe, native)
        deepspeed_checkpoint.protect_gate_keys(self.moe)
        for p in self.moe.deepspeed_moe.experts.parameters():
            p.expert_parallel = True  # type: ignore[attr-defined]  # model.num_params counts them
        self.timing = False
        self.a2a_seconds = 0.0  # DeepSpeed's MOELayer does the all-to-all; it is not timed here
        self.expert_seconds = 0.0

    @property
    def plugin(self) -> PluginRouting:
        return self.moe.deepspeed_moe.gate.plugin  # type: ignore[return-value]

    @property
    def router(self) -> Any:  # type: ignore[override]
        return self.plugin.router

    @property
    def losses(self) -> Any:  # type: ignore[override]
        return self.plugin.losses

    @property
    def tokens_per_expert_E(self) -> torch.Tensor:
        return self.plugin.tokens_per_expert_E

    @property
    def received_per_local_expert_e(self) -> torch.Tensor:
        return self.plugin.received_per_local_expert_e

    @property
    def dropped_tokens(self) -> torch.Tensor:
        return self.plugin.dropped_tokens

    @property
    def last_aux(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.plugin.last_aux

    @last_aux.setter
    def last_aux(self, value: dict[str, torch.Tensor]) -> None:
        self.plugin.last_aux = value

    def reset_stats(self) -> None:
        self.plugin.reset_stats()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y, _, _ = self.moe(x)
        return y, self.moe.aux_terms

    def extra_repr(self) -> str:
        return (
            f"deepspeed MoE, experts={self.num_experts}, local={self.num_local_experts}, top_k={self.top_k}"
        )


def convert_model(model: nn.Module, ep_size: int) -> nn.Module:
    """Swap every ``MoELayer`` of ``model`` for a `DeepSpeedMoELayer` with the same weights (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELayer) and not isinstance(child, DeepSpeedMoELayer):
                setattr(parent, name, DeepSpeedMoELayer(child, ep_size))
    return model
