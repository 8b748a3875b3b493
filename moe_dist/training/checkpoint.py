"""Checkpoints: atomic, verified, resumable at any expert-parallel size.

Layout of ``<run dir>/checkpoints/``::

    step_000100/   meta.json (engine, step, trainer state, file sizes and SHA-256), model.pt,
                   optim.pt, rng_rank<r>.pt (each rank's generator states)
    latest         the name of the newest complete checkpoint

The DeepSpeed engine writes DeepSpeed's files in place of model.pt and optim.pt
(``integrations/deepspeed_checkpoint.py``) through the same ``save_files``, and
``checkpoint.format: dcp`` writes DCP's shards (``dcp_checkpoint.py``) between ``begin_save``
and ``finish_save`` (meta.json ``layout`` says which files hold the weights); which checkpoint a
run starts from (``resume_from``, ``verify``) is ``checkpoint_choice.py``. A checkpoint resumes
only under the engine that wrote it.

Saving (every rank calls ``save``):
1. Expert tensors (parameters with ``expert_parallel`` and their AdamW moments) are all-gathered
   over the EP group into the global layout ``[E, ...]`` (global expert g = ep_rank * e + local id),
   so the files do not depend on the EP size.
2. Rank 0 writes everything into ``.tmp-step_N``, every rank adds its RNG state, then rank 0
   renames the directory to ``step_N`` and replaces ``latest`` (write + ``os.replace``). A crash
   at any point leaves either the old or the new checkpoint as latest, never a half-written one.
3. Only the newest ``checkpoint.keep`` checkpoints are kept.

Loading: rank 0 checks the candidates newest first (``latest``, then older ``step_*``) against
their recorded sizes and hashes; a corrupt one is reported in one line and the next older is
used. Every rank then reads it with ``torch.load(weights_only=True)`` and keeps its slice of the
experts: an EP=2 checkpoint resumes at EP=1 or EP=4. Parameters of older format versions are
mapped to today's names and layout (``checkpoint_upgrade.py``), so their runs continue.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.checkpoint_choice import (
    FORMAT,
    LATEST,
    VERSION,
    CheckpointError,
    list_checkpoints,
    read_meta,
    sha256,
)
from moe_dist.training.checkpoint_upgrade import upgraded_model_state, upgraded_optim_state
from moe_dist.training.grad_sync import is_expert_param
from moe_dist.training.optim import IMPLEMENTATION_KEYS


@dataclass
class Loaded:
    path: Path
    step: int
    trainer: dict[str, Any] = field(default_factory=dict)
    rng_restored: bool = False

    def counts(self, fresh: list[torch.Tensor]) -> list[torch.Tensor]:
        """The trainer's whole-run expert counts per MoE layer; ``fresh`` when none were saved."""
        saved = [torch.tensor(c, dtype=torch.float64) for c in self.trainer.get("counts", [])]
        return saved or fresh


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _barrier(groups: ParallelGroups) -> None:
    if groups.distributed:
        dist.barrier()


# ---------------------------------------------------------------- global <-> local expert layout


def _gather_experts(t_e: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Local ``[e, ...]`` -> global ``[E, ...]`` (EP ranks in order)."""
    if groups.ep_size == 1:
        return t_e.detach().cpu().clone()
    parts = [torch.empty_like(t_e) for _ in range(groups.ep_size)]
    dist.all_gather(parts, t_e.detach().contiguous(), group=groups.ep_group)
    return torch.cat(parts).cpu()


def _local_slice(t_E: torch.Tensor, like_e: torch.Tensor, groups: ParallelGroups, name: str) -> torch.Tensor:
    e = like_e.shape[0]
    if t_E.shape[0] != e * groups.ep_size or t_E.shape[1:] != like_e.shape[1:]:
        raise CheckpointError(
            f"{name}: checkpoint has shape {tuple(t_E.shape)}, "
            f"this model needs {groups.ep_size} x {tuple(like_e.shape)}"
        )
    return t_E[groups.ep_rank * e : (groups.ep_rank + 1) * e]


def _expert_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if is_expert_param(p)}


def global_model_state(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    experts = _expert_names(model)
    return {
        name: _gather_experts(t, groups) if name in experts else t.detach().cpu().clone()
        for name, t in model.state_dict().items()
    }


def global_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, groups: ParallelGroups) -> dict:
    """Optimizer state keyed by parameter name, expert moments in the global layout."""
    names = {id(p): n for n, p in model.named_parameters()}
    state: dict[str, dict[str, Any]] = {}
    param_groups = []
    for group in optimizer.param_groups:
        param_groups.append(
            {k: v for k, v in group.items() if k != "params"}
            | {"param_names": [names[id(p)] for p in group["params"]]}
        )
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            out = {}
            for key, v in sorted(st.items()):
                if isinstance(v, torch.Tensor) and is_expert_param(p) and v.shape == p.shape:
                    out[key] = _gather_experts(v, groups)
                elif isinstance(v, torch.Tensor):
                    out[key] = v.detach().cpu().clone()
                else:
                    out[key] = v
            state[names[id(p)]] = out
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------- save


def save(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups,
    trainer: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank calls it)."""
    model_sd = global_model_state(model, groups)
    optim_sd = global_optim_state(model, optimizer, groups)

    def write(tmp: Path) -> None:
        if groups.rank == 0:
            torch.save(model_sd, tmp / "model.pt")
            torch.save(optim_sd, tmp / "optim.pt")

    return save_files(ckpt_root, step, groups, trainer, keep, write, engine="native", layout="torch")


def save_files(
    ckpt_root: Path,
    step: int,
    groups: ParallelGroups,
    trainer: dict[str, Any],
    keep: int,
    write: Callable[[Path], None],
    engine: str,
    layout: str | None = None,
) -> Path:
    """The atomic part of a save, for any engine (collective): ``write(tmp)`` runs on every rank
    and fills the temporary directory between ``begin_save`` and ``finish_save``."""
    tmp = begin_save(ckpt_root, step, groups)
    write(tmp)
    return finish_save(ckpt_root, step, groups, trainer, keep, engine, layout)


def begin_save(ckpt_root: Path, step: int, groups: ParallelGroups) -> Path:
    """Collective: a fresh ``.tmp-step_N`` directory holding every rank's RNG state; returns it."""
    name = step_dir_name(step)
    tmp = ckpt_root / f".tmp-{name}"
    if groups.rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(groups)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{groups.rank}.pt")
    return tmp


def finish_save(
    ckpt_root: Path,
    step: int,
    groups: ParallelGroups,
    trainer: dict[str, Any],
    keep: int,
    engine: str,
    layout: str | None = None,
) -> Path:
    """Collective, once every rank's files are in ``.tmp-step_N``: rank 0 records sizes and hashes
    in meta.json (``layout``: which files hold the weights, when the engine has more than one),
    renames the directory to ``step_N``, replaces ``latest`` and prunes."""
    name = step_dir_name(step)
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    _barrier(groups)
    if groups.rank == 0:
        files = {
            str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": sha256(f)}
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "engine": engine,
            **({"layout": layout} if layout else {}),
            "step": step,
            "world_size": groups.world_size,
            "ep_size": groups.ep_size,
            "trainer": trainer,
            "files": files,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = ckpt_root / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, ckpt_root / LATEST)
        _fsync_dir(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(groups)
    return final


def restore_rng(path: Path, meta: dict[str, Any], groups: ParallelGroups) -> bool:
    """This rank's generator states from checkpoint ``path``, if it was written by the same
    world and EP size (else the streams stay as seeded); whether they were restored."""
    rng_file = path / f"rng_rank{groups.rank}.pt"
    same_layout = meta["world_size"] == groups.world_size and meta["ep_size"] == groups.ep_size
    if not (same_layout and rng_file.is_file()):
        return False
    rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return True


def _fsync_dir(path: Path) -> None:
    for f in [*path.iterdir(), path] if path.is_dir() else [path]:
        if f.is_file() or f == path:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---------------------------------------------------------------- load


def load(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, groups: ParallelGroups
) -> Loaded:
    """Load checkpoint ``path`` (already verified) into this rank's model and optimizer."""
    meta = read_meta(path, "native")
    experts = _expert_names(model)
    saved = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    saved = upgraded_model_state(saved, meta)
    current = model.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: model does not match the checkpoint "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    new_sd = {}
    for name, cur in current.items():
        t = saved[name]
        if name in experts:
            t = _local_slice(t, cur, groups, name)
        elif t.shape != cur.shape:
            if name in dict(model.named_buffers()):
                t = cur  # per-rank statistics in the local layout (reset every step): keep ours
            else:
                raise CheckpointError(
                    f"{name}: checkpoint has shape {tuple(t.shape)}, model {tuple(cur.shape)}"
                )
        new_sd[name] = t
    model.load_state_dict(new_sd, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(_local_optim_state(path, meta, model, optimizer, groups, experts))
    rng_restored = restore_rng(path, meta, groups)
    return Loaded(
        path=path, step=int(meta["step"]), trainer=meta.get("trainer", {}), rng_restored=rng_restored
    )


def _local_optim_state(
    path: Path,
    meta: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups,
    experts: set[str],
) -> dict:
    saved = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    saved = upgraded_optim_state(saved, meta)
    params = dict(model.named_parameters())
    state, out_groups, index = {}, [], 0
    for gi, group in enumerate(optimizer.param_groups):
        names = [n for n, p in params.items() if any(p is q for q in group["params"])]
        order = {id(p): i for i, p in enumerate(group["params"])}
        names.sort(key=lambda n: order[id(params[n])])
        saved_group = saved["param_groups"][gi] if gi < len(saved["param_groups"]) else {}
        if sorted(saved_group.get("param_names", [])) != sorted(names):
            raise CheckpointError(f"{path}: optimizer parameter group {gi} does not match this model")
        ids = []
        for n in names:
            st = dict(saved["state"].get(n, {}))
            for key, v in st.items():
                if n in experts and isinstance(v, torch.Tensor) and v.dim() == params[n].dim():
                    st[key] = _local_slice(v, params[n], groups, f"optimizer {n}.{key}").clone()
            if st:
                state[index] = st
            ids.append(index)
            index += 1
        # hyper-parameters come back; how the optimizer runs (fused, foreach...) stays this run's
        hyper = {k: v for k, v in saved_group.items() if k not in ("param_names", *IMPLEMENTATION_KEYS)}
        out_groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": ids})
    return {"state": state, "param_groups": out_groups}
