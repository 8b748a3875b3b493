"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay applies to parameters with two or more dimensions (linear, embedding and expert
weights), not to norm gains or biases. NVIDIA apex's ``FusedAdam`` (AdamW mode) is used on CUDA
when apex is importable (NVIDIA's PyTorch container); otherwise torch's AdamW, fused on CUDA.
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


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]

            return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
        except ImportError:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


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
