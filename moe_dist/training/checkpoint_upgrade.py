"""Checkpoints of earlier format versions, read as today's.

- Version 1 named a MoE layer's router ``ffn.router.*``; since version 2 it sits in the layer's
  gate, ``ffn.gate.router.*`` (``upgraded_name``).
- Up to version 2, SwiGLU experts kept the gate and up projections apart; since version 3 they
  are one fused ``w13`` (``layers/split_layout.py``): the halves of every pair are joined,
  parameters and optimizer moments alike. Every other key passes unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_dist.layers.split_layout import join_moments, joined_state


def upgraded_name(name: str, meta: dict[str, Any]) -> str:
    """A parameter's name today for its ``name`` in a checkpoint of ``meta["version"]`` (the
    version-3 join is ``joined_state``'s: two names become one)."""
    if meta.get("version", 1) < 2:
        return name.replace(".ffn.router.", ".ffn.gate.router.")
    return name


def upgraded_model_state(saved: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A saved model state dict (name -> tensor) under today's names and layout."""
    return joined_state({upgraded_name(k, meta): v for k, v in saved.items()})


def upgraded_optim_state(saved: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """moe_dist's name-keyed optimizer state (``{"state": {name: {...}}, "param_groups":
    [{"param_names": [...], ...}]}``) under today's names and layout."""
    state = {upgraded_name(k, meta): v for k, v in saved["state"].items()}
    groups = []
    for group in saved["param_groups"]:
        names = [upgraded_name(n, meta) for n in group.get("param_names", [])]
        kept = list(joined_state(dict.fromkeys(names, None), join=lambda a, b: None))
        groups.append({**group, "param_names": kept})
    return {**saved, "state": joined_state(state, join=join_moments), "param_groups": groups}
