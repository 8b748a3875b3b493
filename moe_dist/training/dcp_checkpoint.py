"""Checkpoints through ``torch.distributed.checkpoint`` (``checkpoint.format: dcp``): a shard per rank.

The directory is the one of ``checkpoint.py`` (``.tmp-step_N`` -> ``step_N``, ``latest``,
meta.json with every file's size and SHA-256, ``layout: dcp``); DCP's files take the place of
model.pt and optim.pt: ``.metadata`` and one ``__<rank>_0.distcp`` per rank.

One flat state dict, built the same way for saving and loading (``_entries``):

- ``model.<name>``: parameters and persistent buffers; ``optim.<name>.<key>``: AdamW's moments
  and step of parameter ``<name>``.
- Every tensor is presented in its GLOBAL shape, so the files do not depend on the layout:
  FSDP-sharded dense tensors are DTensors over the world already; expert tensors (this EP
  rank's ``e`` experts, FSDP-sharded over expert-DP or whole) are viewed as one DTensor
  ``[E, ...]`` on the (ep, dp) mesh (``parallel/mesh.py``), placements ``(Shard(0), Shard(0))``
  under fsdp, ``(Shard(0), Replicate())`` otherwise; replicated dense tensors stay plain (DCP
  writes them once).

Saving (collective): ``begin_save``, then ``dcp.save`` or, with ``checkpoint.async: true``,
``dcp.async_save`` of a copy (the copy is all the step waits for; a process group of its own
carries the background collectives), then ``finish_save`` once the write is done: at the next
save or at the end of the run. A job killed before that leaves the previous checkpoint as
``latest``.

Loading: the shapes recorded in ``.metadata`` are checked against this model first (the first
mismatched parameter is named, with both shapes), then DCP reads each rank's slices of the
global tensors into fresh targets, which are copied into the model and optimizer: any EP and DP
size resumes. ``load_torch_format`` reads today's ``model.pt``/``optim.pt`` into a sharded model
the same way.

Shape legend: E experts (global), e local experts.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from moe_dist.layers.split_layout import split_names
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.parallel.mesh import ParallelMeshes
from moe_dist.training.checkpoint import Loaded, begin_save, finish_save, restore_rng
from moe_dist.training.checkpoint_choice import CheckpointError
from moe_dist.training.checkpoint_upgrade import upgraded_model_state, upgraded_optim_state
from moe_dist.training.grad_sync import is_expert_param

LAYOUT = "dcp"


@dataclass
class _Entry:
    key: str  # in the checkpoint
    name: str  # the parameter or buffer it belongs to (error messages)
    tensor: torch.Tensor  # in the model or optimizer: plain, or a DTensor (FSDP)
    expert: bool
    buffer: bool = False


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _entries(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[_Entry]:
    params = dict(model.named_parameters())
    out = [_Entry(f"model.{n}", n, p, is_expert_param(p)) for n, p in params.items()]
    out += [
        _Entry(f"model.{n}", n, t, False, buffer=True)
        for n, t in model.state_dict().items()
        if n not in params
    ]
    if optimizer is not None:
        for n, p in params.items():
            for key, v in sorted(optimizer.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    moment = v.dim() == p.dim() and v.dim() > 0
                    out.append(_Entry(f"optim.{n}.{key}", n, v, is_expert_param(p) and moment))
    return out


def _global_shape(e: _Entry, ep_size: int) -> torch.Size:
    shape = e.tensor.shape  # a DTensor's shape is its global one (over its own mesh)
    return torch.Size([shape[0] * ep_size, *shape[1:]]) if e.expert else shape


def _presented(e: _Entry, meshes: ParallelMeshes | None, ep_size: int, clone: bool) -> torch.Tensor:
    """The tensor as the checkpoint holds it (module docstring), a copy when ``clone``."""
    t = e.tensor.detach()
    if meshes is None or not e.expert:
        if isinstance(t, DTensor):
            if not clone:
                return t
            return DTensor.from_local(
                _local(t).clone(), t.device_mesh, t.placements, shape=t.shape, stride=t.stride()
            )
        return t.clone() if clone else t
    placements = (Shard(0), Shard(0)) if isinstance(t, DTensor) else (Shard(0), Replicate())
    local_part = _local(t).clone() if clone else _local(t)
    shape = _global_shape(e, ep_size)
    return DTensor.from_local(local_part, meshes.ep_dp, placements, shape=shape, stride=_contiguous(shape))


def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _state(entries: list[_Entry], meshes: ParallelMeshes | None, ep_size: int, clone: bool) -> dict:
    return {e.key: _presented(e, meshes, ep_size, clone) for e in entries}


# ---------------------------------------------------------------- save


class DcpSaver:
    """Writes DCP checkpoints for one run, synchronously or in the background (module docstring)."""

    def __init__(self, groups: ParallelGroups, async_save: bool) -> None:
        self.groups, self.async_save = groups, async_save
        # the background thread's collectives must not interleave with the training's
        self.pg = dist.new_group(backend="gloo") if async_save and groups.distributed else None
        self.pending: tuple[Future, Path, int, dict[str, Any], int] | None = None

    def save(
        self,
        ckpt_root: Path,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meshes: ParallelMeshes | None,
        trainer: dict[str, Any],
        keep: int,
    ) -> None:
        self.wait(complete=True)
        tmp = begin_save(ckpt_root, step, self.groups)
        state = _state(_entries(model, optimizer), meshes, self.groups.ep_size, clone=self.async_save)
        writer = FileSystemWriter(str(tmp))
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.pg)
            self.pending = (future, ckpt_root, step, trainer, keep)  # type: ignore[assignment]
        else:
            dcp.save(state, storage_writer=writer)
            finish_save(ckpt_root, step, self.groups, trainer, keep, "native", LAYOUT)

    def wait(self, complete: bool) -> None:
        """Wait for a background save; ``complete`` makes it a checkpoint (meta.json, rename,
        ``latest``), else it stays a ``.tmp-`` directory, as after a kill."""
        if self.pending is None:
            return
        future, ckpt_root, step, trainer, keep = self.pending
        self.pending = None
        future.result()
        if complete:
            finish_save(ckpt_root, step, self.groups, trainer, keep, "native", LAYOUT)


# ---------------------------------------------------------------- load


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors (a step at learning rate 0 on zero gradients changes no
    weight), so that loading has tensors to fill."""
    if optimizer.state:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def _check_shapes(
    path: Path, entries: list[_Entry], saved: dict[str, torch.Size], ep_size: int
) -> list[_Entry]:
    """The entries to load; CheckpointError for the first parameter whose shape differs or is missing."""
    entries = _split_where_saved_split(entries, saved)
    wanted = []
    for e in entries:
        if e.key not in saved:
            if e.buffer:
                continue
            raise CheckpointError(f"{path}: model does not match the checkpoint (no {e.key} in it)")
        want = _global_shape(e, ep_size)
        if saved[e.key] != want:
            if e.buffer:
                continue  # per-rank statistics in the local layout (reset every step): keep ours
            raise CheckpointError(
                f"{e.name}: checkpoint has shape {tuple(saved[e.key])}, this model {tuple(want)} ({e.key})"
            )
        wanted.append(e)
    unexpected = sorted(k for k in saved if k.startswith("model.") and k not in {e.key for e in entries})
    if unexpected:
        raise CheckpointError(f"{path}: model does not match the checkpoint (unexpected {unexpected[:5]})")
    return wanted


def _split_where_saved_split(entries: list[_Entry], saved: dict[str, torch.Size]) -> list[_Entry]:
    """A fused ``w13`` the checkpoint holds as its two halves (format version <= 2,
    ``checkpoint_upgrade.py``) becomes two entries over views of its halves: DCP reads each half
    straight into its place."""
    out = []
    for e in entries:
        prefix, _, suffix = e.key.partition(e.name)
        halves = split_names(e.name) if e.key not in saved else None
        if halves is None or f"{prefix}{halves[0]}{suffix}" not in saved:
            out.append(e)
            continue
        gate_key, up_key = (f"{prefix}{h}{suffix}" for h in halves)
        if up_key not in saved or e.tensor.dim() == 0:  # GELU's lone gate half; a step count
            out.append(_Entry(gate_key, e.name, e.tensor, e.expert, e.buffer))
            continue
        F_ = e.tensor.shape[-1] // 2
        out.append(_Entry(gate_key, e.name, e.tensor[..., :F_], e.expert, e.buffer))
        out.append(_Entry(up_key, e.name, e.tensor[..., F_:], e.expert, e.buffer))
    return out


def load(
    path: Path,
    meta: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups,
    meshes: ParallelMeshes | None,
) -> Loaded:
    """Load a verified DCP checkpoint into this rank's model and optimizer, at any EP / DP size."""
    init_optimizer_state(optimizer)
    reader = FileSystemReader(str(path))
    saved = {
        k: md.size
        for k, md in reader.read_metadata().state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    entries = _check_shapes(path, _entries(model, optimizer), saved, groups.ep_size)
    state = _state(entries, meshes, groups.ep_size, clone=True)
    dcp.load(state, storage_reader=reader)
    with torch.no_grad():
        for e in entries:
            _local(e.tensor).copy_(_local(state[e.key]))
    return Loaded(path, int(meta["step"]), meta.get("trainer", {}), restore_rng(path, meta, groups))


def load_torch_format(
    path: Path,
    meta: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups,
) -> Loaded:
    """Today's format (rank 0's model.pt / optim.pt, experts in the global layout) into a sharded model."""
    init_optimizer_state(optimizer)
    weights = upgraded_model_state(torch.load(path / "model.pt", map_location="cpu", weights_only=True), meta)
    optim = upgraded_optim_state(torch.load(path / "optim.pt", map_location="cpu", weights_only=True), meta)
    full = {f"model.{k}": v for k, v in weights.items()}
    for name, st in optim["state"].items():
        full |= {f"optim.{name}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)}
    entries = _check_shapes(
        path, _entries(model, optimizer), {k: v.shape for k, v in full.items()}, groups.ep_size
    )
    with torch.no_grad():
        for e in entries:
            t = full[e.key]
            if e.expert:
                n = e.tensor.shape[0]
                t = t[groups.ep_rank * n : (groups.ep_rank + 1) * n]
            if isinstance(e.tensor, DTensor):
                mesh, placements = e.tensor.device_mesh, e.tensor.placements
                t = distribute_tensor(t.to(_local(e.tensor).device), mesh, placements, src_data_rank=None)
            _local(e.tensor).copy_(_local(t))
    return Loaded(path, int(meta["step"]), meta.get("trainer", {}), restore_rng(path, meta, groups))
