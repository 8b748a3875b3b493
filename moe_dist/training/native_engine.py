"""The native engine (``parallel.engine: native``): our model and AdamW over PyTorch's data parallelism.

Shape legend: B micro-batch, S sequence, V vocabulary.

``parallel.data_parallel`` chooses who holds and reduces what (``parallel/groups.py`` for the
ranks; experts are placed by EP in every mode):

- ``replicate`` (default): every rank holds every dense weight and its AdamW state; `GradSync`
  all-reduces the gradients in buckets after the backward.
- ``ddp``: torch's ``DistributedDataParallel`` averages the dense gradients over the world in
  buckets during the backward; `GradSync` reduces only the expert gradients (over expert-DP).
- ``fsdp``: FSDP2 shards dense weights over the world and experts over expert-DP, gradients and
  AdamW state with them, reducing during the backward (``fsdp.py``).

One optimizer step, as ``moe_dist.training.run.train`` drives it:

1. ``forward_backward`` per micro-batch: forward (under bf16 autocast with ``run.precision``
   bf16, the default on CUDA: fp32 master weights, bf16 compute; the experts cast their own
   operands, ``ops/compute_dtype.py``), loss = cross-entropy + the MoE aux terms, backward of
   loss / ``grad_accum`` (gradients add up over micro-batches in fp32; DDP reduces on the last
   one only).
2. ``clip_grad_norm``: finish the reduction, measure the global norm (each expert once), clip to
   ``optim.grad_clip``; the norm stays a device tensor.
3. ``step(nonfinite)``: fused AdamW, told by its ``found_inf`` to leave weights and moments alone
   where the device flag is set (no host read); either way the gradients are dropped.

Precision and data parallelism (``precision.py`` resolves ``run.precision``): under fsdp, bf16 is
FSDP2's ``MixedPrecisionPolicy`` (bf16 parameters in the forward, fp32 gradient reduction);
under replicate and ddp, autocast with the experts' weights cast once per optimizer step. Which
of the two is faster on one GPU is not measured yet (no GPU in the session that built it):
replicate stays the default.

``save`` / ``load``: ``checkpoint.format`` torch (``checkpoint.py``, rank 0 writes the global
layout) or dcp (``dcp_checkpoint.py``, a shard per rank, optionally in the background). Either
format loads in every mode, at any EP and DP size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from moe_dist.config import Config
from moe_dist.models import build_model
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.parallel.mesh import ParallelMeshes
from moe_dist.profile_ranges import named_range
from moe_dist.training import checkpoint, dcp_checkpoint
from moe_dist.training.checkpoint_choice import read_meta
from moe_dist.training.fsdp import ShardedGradients, shard_model
from moe_dist.training.grad_sync import GradSync, is_expert_param
from moe_dist.training.optim import build_optimizer, set_lr, step_unless
from moe_dist.training.precision import resolved_precision


class NativeEngine:
    """The step interface of ``training.run.Engine`` over our own model and optimizer."""

    def __init__(self, cfg: Config, groups: ParallelGroups, device: torch.device) -> None:
        self.groups, self.grad_accum, self.grad_clip = groups, cfg.data.grad_accum, cfg.optim.grad_clip
        self.mode = cfg.parallel.data_parallel
        self.format = cfg.checkpoint.resolved_format(self.mode)
        self.device = device
        self.model = build_model(cfg.model, groups, seed=cfg.run.seed).to(device)
        if cfg.model.compile:
            self.model.compile_blocks()  # before FSDP wraps the blocks, as torchtitan orders it
        self.model.train()
        self.counted = self.model.num_params()  # before FSDP turns the weights into shards
        self.evaluate_model = self.model
        self.forward_model: nn.Module = self.model
        self.meshes: ParallelMeshes | None = None
        self.bf16 = resolved_precision(cfg.run.precision, device) == "bf16"
        self.grads: GradSync | ShardedGradients
        if self.mode == "fsdp":
            shard_model(self.model, self.mesh(), self.bf16)
            self.grads = ShardedGradients(self.model, groups)
        elif self.mode == "ddp" and groups.distributed:
            self.forward_model = _ddp(self.model, groups)
            self.grads = GradSync(self.model, groups, dense_reduced=True)
        else:
            self.grads = GradSync(self.model, groups)
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.saver = (
            dcp_checkpoint.DcpSaver(groups, cfg.checkpoint.async_save) if self.format == "dcp" else None
        )
        self.micro = 0  # micro-batches of this step so far
        self.summary_fields: dict[str, Any] = {"data_parallel": self.mode} if self.mode != "replicate" else {}

    def mesh(self) -> ParallelMeshes | None:
        """The meshes, built on first use (collective: every rank gets here together); None on one process."""
        if self.meshes is None and self.groups.distributed:
            self.meshes = ParallelMeshes.build(self.groups, self.device.type)
        return self.meshes

    def describe(self) -> str:
        n = self.counted
        text = f"{n['total']:,} parameters on rank 0 ({n['expert']:,} in experts), {self.precision_text()}"
        return text if self.mode == "replicate" else f"{text}, data parallel {self.mode}"

    def precision_text(self) -> str:
        if not self.bf16:
            return "fp32"
        return (
            "bf16 compute (FSDP MixedPrecisionPolicy)"
            if self.mode == "fsdp"
            else "bf16 compute, fp32 weights"
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16 and self.mode != "fsdp":  # FSDP's policy casts the parameters itself
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def forward_backward(
        self, x_BS: torch.Tensor, y_BS: torch.Tensor, doc_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.micro += 1
        last = self.micro == self.grad_accum
        no_sync = isinstance(self.forward_model, DistributedDataParallel) and not last
        with self.forward_model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
            with self.autocast():
                logits_BSV, aux_loss, aux_terms = self.forward_model(x_BS, doc_BS)
            task = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten())
            ((task + aux_loss) / self.grad_accum).backward()
        return task, aux_terms

    def clip_grad_norm(self) -> torch.Tensor:
        self.micro = 0
        if isinstance(self.grads, ShardedGradients):
            self.grads.finish()
        else:
            self.grads.reduce()
        return self.grads.clip(self.grad_clip)

    def step(self, nonfinite: torch.Tensor) -> None:
        with named_range("optimizer"):
            step_unless(self.optimizer, nonfinite)
        self.optimizer.zero_grad(set_to_none=True)

    def reshard(self) -> None:
        """FSDP keeps the root's weights gathered after a forward without backward (validation):
        shard them again, so a save or load sees only shards."""
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def save(self, ckpt_root: Path, step: int, trainer_state: dict[str, Any], keep: int) -> None:
        self.reshard()
        if self.saver is None:
            checkpoint.save(ckpt_root, step, self.model, self.optimizer, self.groups, trainer_state, keep)
        else:
            self.saver.save(ckpt_root, step, self.model, self.optimizer, self.mesh(), trainer_state, keep)

    def wait_saves(self, complete: bool) -> None:
        if self.saver is not None:
            self.saver.wait(complete)

    def load(self, path: Path) -> checkpoint.Loaded:
        meta = read_meta(path, "native")
        self.reshard()
        if meta.get("layout", "torch") == dcp_checkpoint.LAYOUT:
            return dcp_checkpoint.load(path, meta, self.model, self.optimizer, self.groups, self.mesh())
        if self.mode == "fsdp":
            return dcp_checkpoint.load_torch_format(path, meta, self.model, self.optimizer, self.groups)
        return checkpoint.load(path, self.model, self.optimizer, self.groups)


def _ddp(model: nn.Module, groups: ParallelGroups) -> DistributedDataParallel:
    """DDP over the world for the dense weights only: experts differ across EP ranks (GradSync
    reduces them over expert-DP), and buffers hold per-rank statistics (never broadcast)."""
    ignore = [n for n, p in model.named_parameters() if is_expert_param(p)]
    ignore += [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(
        model, process_group=groups.world_group, broadcast_buffers=False, init_sync=False
    )
