"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay applies to parameters with two or more dimensions (linear, embedding and expert
weights), not to norm gains or biases. The optimizer is torch's fused AdamW on every device
(``fused=True``: one kernel per parameter group, CUDA and CPU). It is also the only AdamW that
takes a device-side skip flag (``found_inf``, as torch's ``GradScaler`` uses it): `step_unless`
calls an update off without the host reading the flag. NVIDIA apex's ``FusedAdam``, which the
project used on CUDA before, has no such flag (its skip needs a host read every step) and is
no faster than torch's fused kernel, so it is no longer preferred.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_dist.config import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# Optimizer settings that choose a kernel, not the maths: a checkpoint does not set them.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def keep_implementation(saved_groups: list[dict], current_groups: list[dict]) -> list[dict]:
    """Saved parameter groups with this run's implementation settings (``IMPLEMENTATION_KEYS``)."""
    return [
        {**g, **{k: cur[k] for k in IMPLEMENTATION_KEYS if k in cur}}
        for g, cur in zip(saved_groups, current_groups)
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def step_unless(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """``optimizer.step()``, called off on the device where ``nonfinite`` (a bool or 0/1 tensor)
    is set: weights, moments and the step count stay as they were. Fused AdamW reads the flag
    as ``found_inf`` (torch ``optim/adam.py`` ``_fused_adam``); the flag is a float32 tensor
    on the parameters' device."""
    optimizer.found_inf = nonfinite.to(torch.float32).reshape(())  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None  # type: ignore[attr-defined]


def lr_at(step: int, optim: OptimizerConfig, sched: ScheduleConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based), ``optim.lr`` times `lr_factor`."""
    return optim.lr * lr_factor(step, sched)


def lr_factor(step: int, sched: ScheduleConfig) -> float:
    """The schedule's multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    ``cosine`` / ``linear`` / ``constant``: linear warmup over ``warmup_steps`` from
    ``warmup_start_ratio`` (factor r + (1 - r) (step + 1) / W, so the last warmup step is at the
    peak; SimBal warms up from 10% of the peak), then cosine or linear decay to ``min_lr_ratio``
    at the last step, or the peak throughout.

    ``wsd``: Hugging Face's ``get_wsd_schedule`` (transformers ``optimization.py``,
    ``_get_wsd_scheduler_lambda``, linear warmup), as the official LPR training calls it with W
    warmup, ``steps - W - D`` stable and D = ``decay_steps`` decay steps:
      step < W:        m + (1 - m) step / W       (from min_lr_ratio m at step 0; HF's warmup)
      step < W + S:    1
      step < W + S + D: m + (1 - m) g(p), p = (step - W - S) / D, g = 0.5 (1 + cos(pi p)) (cosine,
                       HF's default num_cycles 0.5), 1 - p (linear) or 1 - sqrt(p) (1-sqrt)
      after:           m
    """
    W = sched.warmup_steps
    m = sched.min_lr_ratio
    if sched.kind == "wsd":
        D = sched.wsd_decay_steps()
        S = sched.steps - W - D
        if step < W:
            return m + (1.0 - m) * step / max(1, W)
        if step < W + S:
            return 1.0
        if step < W + S + D:
            p = (step - W - S) / max(1, D)
            shape = {
                "cosine": 0.5 * (1.0 + math.cos(math.pi * p)),
                "linear": 1.0 - p,
                "1-sqrt": 1.0 - math.sqrt(p),
            }[sched.decay_shape]
            return m + (1.0 - m) * shape
        return m
    if step < W:
        r = sched.warmup_start_ratio
        return r + (1.0 - r) * (step + 1) / W
    if sched.kind == "constant":
        return 1.0
    progress = min(1.0, (step - W) / max(1, sched.steps - W))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if sched.kind == "cosine" else 1.0 - progress
    return m + (1.0 - m) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
