"""The small MoE configs the DeepSpeed and Megatron integration tests both build.

Shape legend: H hidden, E experts.
"""

from __future__ import annotations

from moe_dist.config import MoEConfig, validate_moe
from moe_dist.registry import LOSSES

H, E = 16, 4


def moe_config(router: dict, losses: list[dict], capacity_factor: float | None = None) -> MoEConfig:
    cfg = MoEConfig(
        num_experts=E,
        router=router,
        losses=losses,
        experts={"ffn_hidden_size": 24},
        capacity_factor=capacity_factor,
    )
    assert validate_moe(cfg, H) == []
    return cfg


def valid_losses(router_name: str) -> list[dict]:
    """Every registered loss this router accepts (SimBal needs a router weight, ...)."""
    out = []
    for name in LOSSES.names():
        cfg = MoEConfig(
            num_experts=E, router={"name": router_name, "top_k": 2}, losses=[{"name": name, "coef": 0.1}]
        )
        if not validate_moe(cfg, H):
            out.append({"name": name, "coef": 0.1})
    return out


def transformer_config(cfg: MoEConfig, ep_size: int = 1, hidden: int = H, heads: int = 4, **extra):  # noqa: ANN003, ANN201
    """Megatron-Core's ``TransformerConfig`` for ``cfg`` on CPU (allgather dispatcher, no biases)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_dist.integrations.megatron import transformer_config_fields

    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=heads,
        add_bias_linear=False,
        use_cpu_initialization=True,
        moe_token_dispatcher_type="allgather",
        **transformer_config_fields(cfg, ep_size),
        **extra,
    )
