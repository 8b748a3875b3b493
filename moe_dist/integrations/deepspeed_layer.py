"""`DeepSpeedMoELayer`: a DeepSpeed ``MoE`` (with `MoeDistGate`) in the place of a native ``MoELayer``.

Why DeepSpeed ``MoE`` layers and not our ``MoELayer`` with marked expert parameters: the engine
treats a model as MoE only when it contains ``deepspeed.moe.layer.MoE`` modules
(``has_moe_layers``); only then does it create the expert-parallel groups, reduce expert
gradients over the expert-data-parallel group and keep ZeRO's MoE parameter groups apart.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist.integrations import deepspeed_checkpoint
from moe_dist.integrations.deepspeed_moe import MoeDistDeepSpeedMoE, build_deepspeed_moe, copy_from_native
from moe_dist.layers.gate import Gate
from moe_dist.layers.moe_layer import MoELayer


class DeepSpeedMoELayer(nn.Module):
    """A DeepSpeed ``MoE`` built from a native ``MoELayer``'s config and weights.

    ``forward(x_BSH) -> (y_BSH, aux)`` like ``MoELayer`` (aux: weighted terms by name). Its `Gate`
    (``.gate``: router, losses, statistics) is the one DeepSpeed's gate holds; DeepSpeed's
    ``MOELayer`` does the all-to-all, so the gate's timings stay zero.
    """

    def __init__(self, native: MoELayer, ep_size: int) -> None:
        super().__init__()
        self.moe: MoeDistDeepSpeedMoE = build_deepspeed_moe(
            native.cfg, native.hidden_size, ep_size=ep_size, model_scope=True
        )
        copy_from_native(self.moe, native)
        deepspeed_checkpoint.protect_gate_keys(self.moe)
        for p in self.moe.deepspeed_moe.experts.parameters():
            p.expert_parallel = True  # type: ignore[attr-defined]  # model.num_params counts them

    @property
    def gate(self) -> Gate:
        return self.moe.deepspeed_moe.gate.gate  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y, _, _ = self.moe(x)
        return y, self.moe.aux_terms

    def extra_repr(self) -> str:
        g = self.gate
        return f"deepspeed MoE, experts={g.num_experts}, local={g.num_local_experts}, top_k={g.top_k}"


def convert_model(model: nn.Module, ep_size: int) -> nn.Module:
    """Swap every ``MoELayer`` of ``model`` for a `DeepSpeedMoELayer` with the same weights (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELayer):
                setattr(parent, name, DeepSpeedMoELayer(child, ep_size))
    return model
