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
