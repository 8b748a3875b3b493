"""The DeepSpeed engine (``parallel.engine: deepspeed``; ZeRO stage ``parallel.zero_stage``).

Shape legend: B micro-batch, S sequence, V vocabulary.

Why DeepSpeed ``MoE`` layers (with `MoeDistGate`) and not our ``MoELayer`` with marked expert
parameters: the engine treats a model as MoE only when it contains ``deepspeed.moe.layer.MoE``
modules (``has_moe_layers``); only then does it create the expert-parallel groups, reduce expert
gradients over the expert-data-parallel group and keep ZeRO's MoE parameter groups apart. Our
``MoELayer`` with ``allreduce = False`` parameters would have its expert gradients averaged over
the whole data-parallel group, i.e. mixed between different experts at EP > 1. So every
``MoELayer`` of the model is swapped for a `DeepSpeedMoELayer`: DeepSpeed's MoE (dispatch,
all-to-all, experts) around our router and losses, initialised with the native layer's weights.

`DeepSpeedEngine` is what ``moe_dist.training.run.train`` drives (the same loop as the native engine):

1. Build: DeepSpeed's communication backend, the native model (same seed) with every MoE block
   converted; parameter groups decay / no-decay, then
   ``split_params_into_different_moe_groups_for_optimizer`` (expert parameters in their own
   ``moe`` groups, needed by ZeRO); torch's fused AdamW; ``deepspeed.initialize`` with
   ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``gradient_clipping``,
   ``zero_optimization.stage`` and, with ``run.precision`` bf16, ``bf16.enabled`` (DeepSpeed
   then holds bf16 weights with fp32 master copies in its optimizer wrapper, its own mixed
   precision; our layers compute in the weights' dtype).
2. ``forward_backward`` per micro-batch: ``engine(x, doc)``, ``engine.backward(task + aux)``; the
   accumulation boundary is set explicitly (``set_gradient_accumulation_boundary``: the last
   micro-batch), so DeepSpeed reduces the gradients in that backward and the norm can be read
   before any update.
3. ``clip_grad_norm``: the global norm of the reduced gradients. ZeRO 1/2:
   ``optimizer.scaled_global_norm()`` over the gradient partitions (the norm DeepSpeed clips
   with; fp32, so no loss scale). ZeRO 0: our ``global_grad_norm`` over the whole ``p.grad``
   (DeepSpeed's own ZeRO-0 clip averages per-rank norms, which is not the norm of the gradient).
   DeepSpeed clips inside ``engine.step()``.
4. ``step(nonfinite)``: ``engine.step()`` (clip, AdamW, zero the gradients) with the device flag
   handed to the fused AdamW as ``found_inf`` (``optim.step_unless``): where it is set the update
   is called off on the device, DeepSpeed still drops the gradients and its ZeRO partitions,
   weights and moments stay as they were (at ZeRO 1/2 DeepSpeed would skip a non-finite gradient
   by itself, but not a non-finite loss with finite gradients). DeepSpeed's own step makes host
   reads of its own (overflow checks, ZeRO bookkeeping) that moe_dist does not control.
5. ``save`` / ``load``: ``deepspeed_checkpoint`` (DeepSpeed's files, our meta.json).

Run it with ``deepspeed --num_gpus N --master_addr 127.0.0.1 --no_local_rank $(which moe-dist)
train CONFIG --set parallel.engine=deepspeed`` (on CPU: ``DS_ACCELERATOR=cpu``, gloo, and
``deepspeed --num_nodes 1 --num_gpus N`` is read as processes per node).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import Config, ConfigError, deepspeed_engine_errors
from moe_dist.integrations import deepspeed_checkpoint
from moe_dist.integrations.deepspeed_layer import convert_model
from moe_dist.models import build_model
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.parallel.startup import pick_backend
from moe_dist.training.checkpoint import Loaded
from moe_dist.training.grad_sync import global_grad_norm
from moe_dist.training.optim import set_lr
from moe_dist.training.precision import resolved_precision


def deepspeed_config(cfg: Config, bf16: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config our YAML implies (``bf16``: DeepSpeed's bf16 mode)."""
    return {
        **({"bf16": {"enabled": True}} if bf16 else {}),
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.data.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def initialize(model: nn.Module, cfg: Config, bf16: bool = False) -> tuple[Any, torch.optim.AdamW]:
    """``deepspeed.initialize`` for a converted model: MoE parameter groups, AdamW, our ZeRO stage;
    the engine and its client optimizer."""
    import deepspeed  # noqa: PLC0415 - heavy, only for this engine
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: PLC0415

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        [
            {"name": "decay", "params": decay, "weight_decay": cfg.optim.weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]
    )
    adamw = torch.optim.AdamW(
        param_groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=deepspeed_config(cfg, bf16))
    return engine, adamw


class DeepSpeedEngine:
    """The step interface of ``training.run.Engine`` over ``deepspeed.initialize`` (module docstring)."""

    def __init__(self, cfg: Config, groups: ParallelGroups, device: torch.device) -> None:
        import deepspeed  # noqa: PLC0415 - heavy, only for this engine

        errors = deepspeed_engine_errors(cfg)
        if errors:
            raise ConfigError(errors)
        # 1. build
        deepspeed.init_distributed(dist_backend=pick_backend(cfg.parallel))
        self.groups, self.grad_accum, self.zero_stage = groups, cfg.data.grad_accum, cfg.parallel.zero_stage
        self.model = convert_model(build_model(cfg.model, groups, seed=cfg.run.seed), cfg.parallel.ep_size)
        self.bf16 = resolved_precision(cfg.run.precision, device) == "bf16"
        self.engine, self.adamw = initialize(self.model.to(device), cfg, self.bf16)
        self.evaluate_model = self.engine
        self.summary_fields: dict[str, Any] = {"engine": "deepspeed", "zero_stage": self.zero_stage}
        self.micro = 0  # micro-batches of this step so far

    def describe(self) -> str:
        return f"DeepSpeed engine, ZeRO {self.zero_stage}, {'bf16' if self.bf16 else 'fp32'}"

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine.optimizer, lr)

    def forward_backward(
        self, x_BS: torch.Tensor, y_BS: torch.Tensor, doc_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # 2. the last micro-batch is the boundary: its backward reduces the gradients
        self.micro += 1
        self.engine.set_gradient_accumulation_boundary(self.micro == self.grad_accum)
        logits_BSV, aux_loss, aux_terms = self.engine(x_BS, doc_BS)
        task = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten())
        self.engine.backward(task + aux_loss)  # the engine divides by gradient_accumulation_steps
        return task, aux_terms

    def clip_grad_norm(self) -> torch.Tensor:
        # 3. the norm before DeepSpeed clips (in engine.step)
        if self.zero_stage > 0:
            return self.engine.optimizer.scaled_global_norm()
        from deepspeed.moe.utils import is_moe_param  # noqa: PLC0415 - heavy, only for this engine

        grads = [p for p in self.model.parameters() if p.grad is not None]
        dense = [p.grad for p in grads if not is_moe_param(p)]
        expert = [p.grad for p in grads if is_moe_param(p)]
        return global_grad_norm(dense, expert, self.groups)  # type: ignore[arg-type]

    def step(self, nonfinite: torch.Tensor) -> None:
        # 4. clip, update unless flagged, zero the gradients
        self.adamw.found_inf = nonfinite.to(torch.float32).reshape(())  # type: ignore[attr-defined]
        try:
            self.engine.step()
        finally:
            self.adamw.found_inf = None  # type: ignore[attr-defined]
            self.micro = 0

    def save(self, ckpt_root: Path, step: int, trainer_state: dict[str, Any], keep: int) -> None:
        # 5. checkpoints
        deepspeed_checkpoint.save(self.engine, ckpt_root, step, self.groups, trainer_state, keep)

    def wait_saves(self, complete: bool) -> None:
        pass  # DeepSpeed's save returns once its files are written

    def load(self, path: Path) -> Loaded:
        return deepspeed_checkpoint.load(self.engine, path, self.groups)
