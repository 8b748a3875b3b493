"""SwiGLU weights saved in the split layout of format versions <= 2, joined into today's fused one.

Up to checkpoint format version 2, SwiGLU experts kept the gate and up projections apart:
``w1_eHF`` / ``w3_eHF`` (routed experts), ``w1_HF`` / ``w3_HF`` (shared experts, DeepSpeed's
per-expert MLPs). Since version 3 each pair is one fused ``w13`` = ``[w1 | w3]`` along the last
axis (Hugging Face's ``gate_up_proj`` layout). ``joined_state`` rewrites a state mapping (model
weights or optimizer moments by parameter name); ``join_on_load`` makes a module accept the old
keys in ``load_state_dict`` (DeepSpeed loads its own files through it); ``joined_param_states``
rewrites a torch optimizer's index-keyed state dict.

Shape legend: e experts, H hidden size, F ffn hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# old gate half, old up half -> fused name (suffixes of parameter names)
SPLIT_PAIRS = (("w1_eHF", "w3_eHF", "w13_eHG"), ("w1_HF", "w3_HF", "w13_HG"))


def fused_name(name: str) -> tuple[str, str] | None:
    """``(fused name, up-half name)`` when ``name`` is an old gate half, else None."""
    for gate, up, fused in SPLIT_PAIRS:
        if name.endswith(gate):
            base = name[: -len(gate)]
            return base + fused, base + up
    return None


def split_names(name: str) -> tuple[str, str] | None:
    """``(gate-half name, up-half name)`` of the old layout for today's fused ``name``."""
    for gate, up, fused in SPLIT_PAIRS:
        if name.endswith(fused):
            base = name[: -len(fused)]
            return base + gate, base + up
    return None


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], dim=-1)


def joined_state(state: dict[str, Any], join: Callable[[Any, Any], Any] = _cat) -> dict[str, Any]:
    """``state`` (name -> value, in order) with every old split pair joined under its fused name
    (at the gate half's place; ``join(gate, up)`` makes the value). A GELU expert's lone gate
    half is renamed; every other name passes unchanged."""
    ups = {hit[1] for name in state if (hit := fused_name(name)) is not None and hit[1] in state}
    out: dict[str, Any] = {}
    for name, value in state.items():
        if name in ups:
            continue
        hit = fused_name(name)
        if hit is None:
            out[name] = value
        else:
            out[hit[0]] = join(value, state[hit[1]]) if hit[1] in state else value
    return out


def join_moments(gate_state: dict[str, Any], up_state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's optimizer state from its two halves': moments joined, the step kept."""
    out = dict(gate_state)
    for key, v in gate_state.items():
        u = up_state.get(key)
        if isinstance(v, torch.Tensor) and isinstance(u, torch.Tensor) and v.dim() > 0:
            out[key] = _cat(v, u)
    return out


def pair_params(model: nn.Module) -> set[int]:
    """``id`` of every fused SwiGLU weight of ``model``: the split layout held each as two
    parameters. A module names its own in ``split_pairs`` (a module attribute, so it survives
    the deep copies DeepSpeed makes of an expert)."""
    return {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "split_pairs", ())}


def join_on_load(module: nn.Module) -> None:
    """Let ``module.load_state_dict`` take its fused weights in the old split layout."""

    def hook(mod: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        own = {k: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix) :]}
        joined = joined_state(own)
        if joined.keys() != own.keys():
            for k in own:
                del state[k]
            state.update(joined)

    module.register_load_state_dict_pre_hook(hook)


def joined_param_states(saved: dict[str, Any], fused: list[list[bool]]) -> dict[str, Any]:
    """A torch optimizer's ``state_dict()`` of the split layout (state keyed by parameter index,
    groups listing indices) for today's parameter groups; ``fused[g][i]``: whether parameter i
    of group g is a joined pair (it takes two saved entries, gate then up)."""
    state, groups, index = {}, [], 0
    for saved_group, flags in zip(saved["param_groups"], fused):
        old = list(saved_group["params"])
        if len(old) != len(flags) + sum(flags):
            raise ValueError(
                f"optimizer group of {len(old)} saved parameters cannot become {len(flags)} "
                f"with {sum(flags)} joined pairs"
            )
        ids, at = [], 0
        for is_pair in flags:
            if is_pair:
                st = join_moments(saved["state"].get(old[at], {}), saved["state"].get(old[at + 1], {}))
                at += 2
            else:
                st = saved["state"].get(old[at], {})
                at += 1
            if st:
                state[index] = st
            ids.append(index)
            index += 1
        groups.append({**saved_group, "params": ids})
    return {**saved, "state": state, "param_groups": groups}
