"""Checkpoints of earlier format versions, read as today's.

- Version 1 named a MoE layer's router ``ffn.router.*``; since version 2 it sits in the layer's
  gate, ``ffn.gate.router.*`` (``upgraded_name``).
- Up to version 2, SwiGLU experts kept the gate and up projections apart: ``w1_eHF`` and
  ``w3_eHF`` (routed experts), ``w1_HF`` and ``w3_HF`` (shared experts, DeepSpeed's per-expert
  MLPs). Since version 3 they are one fused ``w13`` = ``[w1 | w3]`` along the last axis (the
  layout of Hugging Face's ``gate_up_proj``): ``joined_state`` concatenates the two halves of
  every such pair, parameters and optimizer moments alike; a GELU expert's lone ``w1`` is
  renamed. Every other key passes unchanged.

Shape legend: e experts, H hidden size, F ffn hidden size, G = 2F (SwiGLU) or F (GELU).
"""

from __future__ import annotations

from typing import Any

import torch

# old gate half, old up half -> fused name (by suffix of the parameter's name)
SPLIT_PAIRS = (("w1_eHF", "w3_eHF", "w13_eHG"), ("w1_HF", "w3_HF", "w13_HG"))


def upgraded_name(name: str, meta: dict[str, Any]) -> str:
    """A parameter's name today for its ``name`` in a checkpoint of ``meta["version"]`` (the
    version-3 join is ``joined_state``'s: two names become one)."""
    if meta.get("version", 1) < 2:
        return name.replace(".ffn.router.", ".ffn.gate.router.")
    return name


def fused_name(name: str) -> tuple[str, str | None] | None:
    """``(fused name, up-half name or None)`` when ``name`` is an old gate half, else None."""
    for gate, up, fused in SPLIT_PAIRS:
        if name.endswith(gate):
            base = name[: -len(gate)]
            return base + fused, base + up
    return None


def split_names(name: str) -> tuple[str, str] | None:
    """``(gate-half name, up-half name)`` of the old checkpoint for today's fused ``name``."""
    for gate, up, fused in SPLIT_PAIRS:
        if name.endswith(fused):
            base = name[: -len(fused)]
            return base + gate, base + up
    return None


def joined_state(state: dict[str, Any], join: Any = None) -> dict[str, Any]:
    """``state`` (name -> value) with every old split pair joined under its fused name.

    ``join(gate_value, up_value)`` makes the fused value; the default concatenates tensors along
    the last axis. Names without a pair pass unchanged; a GELU expert's lone gate half is
    renamed."""
    join = join or (lambda a, b: torch.cat([a, b], dim=-1))
    out: dict[str, Any] = {}
    ups = set()
    for name in state:
        hit = fused_name(name)
        if hit is not None and hit[1] in state:
            ups.add(hit[1])
    for name, value in state.items():
        if name in ups:
            continue
        hit = fused_name(name)
        if hit is None:
            out[name] = value
        elif hit[1] in state:
            out[hit[0]] = join(value, state[hit[1]])
        else:
            out[hit[0]] = value  # GELU: no up projection
    return out


def join_moments(gate_state: dict[str, Any], up_state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's optimizer state from its two halves' (moments joined, the step kept)."""
    out = dict(gate_state)
    for key, v in gate_state.items():
        u = up_state.get(key)
        if isinstance(v, torch.Tensor) and isinstance(u, torch.Tensor) and v.dim() > 0:
            out[key] = torch.cat([v, u], dim=-1)
    return out


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
