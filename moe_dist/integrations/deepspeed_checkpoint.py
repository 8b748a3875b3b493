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
``gate.gate.*``.

Resuming needs the same world size and EP size: DeepSpeed's optimizer files are per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.checkpoint import Loaded, restore_rng, save_files
from moe_dist.training.checkpoint_choice import CheckpointError, read_meta

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


def load(engine: Any, path: Path, groups: ParallelGroups) -> Loaded:
    """Load the verified checkpoint ``path`` into ``engine`` (weights, experts, optimizer) and
    this rank's generators."""
    meta = read_meta(path, "deepspeed")
    if (meta["world_size"], meta["ep_size"]) != (groups.world_size, groups.ep_size):
        raise CheckpointError(
            f"{path}: written by world {meta['world_size']} x EP {meta['ep_size']}; the deepspeed "
            f"engine resumes only the same layout (this run: world {groups.world_size} x EP {groups.ep_size})"
        )
    loaded_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load there")
    restored = restore_rng(path, meta, groups)
    return Loaded(path=path, step=int(meta["step"]), trainer=meta.get("trainer", {}), rng_restored=restored)
