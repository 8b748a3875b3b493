"""Which checkpoint a run starts from: find, verify (sizes and SHA-256), choose, or refuse a fresh start.

A checkpoint is a ``step_N`` directory whose ``meta.json`` names the format and lists every file
with its size and hash; ``latest`` in the checkpoint root names the newest complete one. Both
engines use these functions (``checkpoint.py`` writes and reads the native files,
``integrations/deepspeed_checkpoint.py`` DeepSpeed's).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from moe_dist.config import ConfigError
from moe_dist.parallel.groups import ParallelGroups

FORMAT = "moe_dist.checkpoint"  # the format's name in meta.json (not a module path)
# 2: a MoE layer's router sits in its gate (``ffn.gate.router.*``); version 1 named it ``ffn.router.*``
# 3: SwiGLU experts' gate and up projections fused (``w13``); up to 2 apart (checkpoint_upgrade.py)
VERSION = 3
LATEST = "latest"


class CheckpointError(Exception):
    """No usable checkpoint where one was asked for."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(path: Path, engine: str) -> dict[str, Any]:
    """meta.json of a verified checkpoint, refusing one another engine wrote."""
    meta = json.loads((path / "meta.json").read_text())
    written_by = meta.get("engine", "native")
    if written_by != engine:
        raise CheckpointError(
            f"{path}: written by parallel.engine {written_by}; resume it with that engine "
            f"(this run: {engine})"
        )
    return meta


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete-looking ``step_*`` directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), key=lambda p: p.name)


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete, uncorrupted checkpoint, else why not (one line)."""
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable ({exc.__class__.__name__})"
    if meta.get("format") != FORMAT:
        return "meta.json is not a moe_dist checkpoint"
    for fname, rec in meta.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            return f"{fname} missing"
        size = f.stat().st_size
        if size != rec["bytes"]:
            return f"{fname} has {size} bytes, expected {rec['bytes']} (truncated?)"
        if sha256(f) != rec["sha256"]:
            return f"{fname} checksum mismatch (corrupt)"
    return None


def candidates(path: Path) -> list[Path]:
    """Checkpoints to try, newest first: ``path`` may be a run's checkpoint root or one step_* dir."""
    if (path / "meta.json").exists() or path.name.startswith("step_"):
        older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
        return [path, *reversed(older)]
    found = list(reversed(list_checkpoints(path)))
    pointer = path / LATEST
    if pointer.is_file():
        latest = path / pointer.read_text().strip()
        found = [latest] + [p for p in found if p != latest]
    return found


def refuse_existing_checkpoints(ckpt_root: Path) -> None:
    """A fresh start (no ``--resume``) must not overwrite a run that has checkpoints: ConfigError.
    The launcher calls it too, so the refusal comes before any rank starts."""
    if list_checkpoints(ckpt_root):
        raise ConfigError(
            [
                f"run.name: {ckpt_root.parent} already has checkpoints (newest "
                f"{list_checkpoints(ckpt_root)[-1].name}); continue it with --resume, "
                "or start a new run with --set run.name=NEW"
            ]
        )


def resume_from(resume: str | None, ckpt_root: Path, groups: ParallelGroups, log: Any = None) -> Path | None:
    """The checkpoint a run starts from, for either engine: ``resume`` None is a fresh start (an
    error when the run already has checkpoints: nothing is overwritten by accident); "" is this
    run's newest usable checkpoint, or a fresh start when none was saved yet (elastic restarts
    rely on it); anything else a checkpoint root or one ``step_*`` directory."""
    if resume is None:
        refuse_existing_checkpoints(ckpt_root)
        return None
    if resume == "" and not candidates(ckpt_root):
        return None
    return choose(Path(resume) if resume else ckpt_root, groups, log)


def finished_run(resume: str, ckpt_root: Path, steps: int) -> str | None:
    """Why ``--resume`` has nothing to train (the checkpoint it would load is at ``steps`` or
    beyond), or None. Reads meta.json only; the verification of ``choose`` runs when the answer
    is yes, so a corrupt newest checkpoint (an older one then loads) does not count as finished."""
    found = candidates(Path(resume) if resume else ckpt_root)
    if not found:
        return None
    try:
        step = int(json.loads((found[0] / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if step < steps or verify(found[0]) is not None:
        return None
    return (
        f"--resume: the run is finished: {found[0]} is at step {step} of schedule.steps {steps}; "
        f"nothing to train. To train it longer, raise schedule.steps (e.g. --set schedule.steps={2 * steps})"
    )


def choose(path: Path, groups: ParallelGroups, log: Any = None) -> Path:
    """The newest usable checkpoint under ``path`` (rank 0 decides; every rank gets the answer)."""
    choice: list[Any] = [None]
    if groups.rank == 0:
        tried = candidates(path)
        for cand in tried:
            problem = verify(cand)
            if problem is None:
                choice[0] = str(cand)
                break
            print(
                f"checkpoint {cand} is unusable: {problem}; trying the previous one", file=log or sys.stderr
            )
        if choice[0] is None:
            choice[0] = "" if tried else None
    if groups.distributed:
        dist.broadcast_object_list(choice, src=0)
    if not choice[0]:
        why = "no usable checkpoint (all corrupt)" if choice[0] == "" else "no checkpoint"
        raise CheckpointError(f"--resume: {why} in {path}")
    return Path(choice[0])
