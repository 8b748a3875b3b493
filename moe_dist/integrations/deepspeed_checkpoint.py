"""Checkpoints of the DeepSpeed engine: DeepSpeed's own files, moe_dist's atomic discipline.

``<run dir>/checkpoints/step_N/`` holds what ``engine.save_checkpoint`` writes (module states,
one file per expert, optimizer states) plus moe_dist's ``meta.json`` (engine, step, trainer
state, every file's size and SHA-256) and ``rng_rank<r>.pt``; ``latest`` names the newest.
``moe_dist.training.checkpoint.save_files`` does the atomic part for both engines: the engine writes
into ``.tmp-step_N``, rank 0 renames it and replaces ``latest``, so a crash mid-save leaves the
previous checkpoint in place; ``--resume`` verifies hashes and falls back to an older one.

Why ``protect_gate_keys``: DeepSpeed's MoE checkpoint treats every state-dict key under a
``deepspeed.moe.layer.MoE`` module that contains "expert" as one expert's weight, filed by the
number after ``deepspeed_experts.``; keys of ours that merely contain the word (the DeepSeek
router's ``expert_bias_E``, ``shared_experts.*``) would make it fail. They are renamed on the
way out ("expert" -> "EXPERT") and back on the way in, so DeepSpeed keeps them with the rest
of the module. On the way in, a version-1 checkpoint's ``gate.plugin.*`` keys also become today's
``gate.gate.*``, and a version <= 2 checkpoint's split SwiGLU weights are joined
(``_join_split_optimizer_state``).

Resuming needs the same world size and EP size: DeepSpeed's optimizer files are per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_dist.layers.split_layout import joined_param_states, pair_params
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.checkpoint import Loaded, restore_rng, save_files
from moe_dist.training.checkpoint_choice import CheckpointError, read_meta
from moe_dist.training.optim import keep_implementation

_EXPERT_WEIGHTS = "deepspeed_moe.experts."  # DeepSpeed's own expert weights: left as they are
_WORD, _MASK = "expert", "EXPERT"
# Checkpoint format version 1 named the gate's routing stage "plugin" (now the `Gate`, "gate").
_V1_GATE, _GATE = "deepspeed_moe.gate.plugin.", "deepspeed_moe.gate.gate."


def protect_gate_keys(moe: nn.Module) -> None:
    """Rename this MoE module's non-expert keys that contain "expert" in its state dicts (see
    the module docstring); loading renames them back."""

    def on_save(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state if k.startswith(prefix) and _WORD in k[len(prefix) :]]:
            if not key.startswith(prefix + _EXPERT_WEIGHTS):
                state[prefix + key[len(prefix) :].replace(_WORD, _MASK)] = state.pop(key)

    def on_load(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state if k.startswith(prefix) and _MASK in k[len(prefix) :]]:
            state[prefix + key[len(prefix) :].replace(_MASK, _WORD)] = state.pop(key)
        for key in [k for k in state if k.startswith(prefix + _V1_GATE)]:
            state[prefix + _GATE + key[len(prefix + _V1_GATE) :]] = state.pop(key)

    moe.register_state_dict_post_hook(on_save)
    moe.register_load_state_dict_pre_hook(on_load)


def save(engine: Any, ckpt_root: Path, step: int, groups: ParallelGroups, trainer: dict, keep: int) -> Path:
    """Checkpoint ``step`` (collective: every rank calls it)."""

    def write(tmp: Path) -> None:
        engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)

    return save_files(ckpt_root, step, groups, trainer, keep, write, engine="deepspeed")


def _optimizer_state_hook(engine: Any, path: Path, join_split: bool) -> Any:
    """A pre-hook on the client AdamW's ``load_state_dict`` (ZeRO 0, where DeepSpeed hands it
    the saved state as it is): the saved groups keep this run's kernel settings (fused, ...),
    and with ``join_split`` a checkpoint of format version <= 2, which held SwiGLU gate and up
    projections as two parameters (``layers/split_layout.py``), has their moments joined (the
    weights are joined by the modules' own load hooks). ZeRO 1/2's flat partitions are not
    upgraded. Returns the hook's handle, or None."""
    optimizer = engine.optimizer
    is_torch = isinstance(optimizer, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0
    pairs = pair_params(engine.module) if join_split else set()
    if not is_torch:
        if pairs:
            raise CheckpointError(
                f"{path}: a checkpoint of format version <= 2 (split gate/up expert weights) resumes under "
                "the deepspeed engine at ZeRO stage 0 only (resume it at stage 0 once, or with the native "
                "engine)"
            )
        return None
    current = optimizer.param_groups
    fused = [[id(p) in pairs for p in group["params"]] for group in current]

    def hook(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        if pairs:
            state = joined_param_states(state, fused)
        return {**state, "param_groups": keep_implementation(state["param_groups"], current)}

    return optimizer.register_load_state_dict_pre_hook(hook)


def load(engine: Any, path: Path, groups: ParallelGroups) -> Loaded:
    """Load the verified checkpoint ``path`` into ``engine`` (weights, experts, optimizer) and
    this rank's generators."""
    meta = read_meta(path, "deepspeed")
    if (meta["world_size"], meta["ep_size"]) != (groups.world_size, groups.ep_size):
        raise CheckpointError(
            f"{path}: written by world {meta['world_size']} x EP {meta['ep_size']}; the deepspeed "
            f"engine resumes only the same layout (this run: world {groups.world_size} x EP {groups.ep_size})"
        )
    upgrade = _optimizer_state_hook(engine, path, join_split=meta.get("version", 1) < 3)
    try:
        loaded_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    finally:
        if upgrade is not None:
            upgrade.remove()
    if loaded_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load there")
    restored = restore_rng(path, meta, groups)
    return Loaded(path=path, step=int(meta["step"]), trainer=meta.get("trainer", {}), rng_restored=restored)
