"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning rate.

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
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < sched.warmup_steps:
        return optim.lr * (step + 1) / sched.warmup_steps
    span = max(1, sched.steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    ratio = sched.min_lr_ratio + (1.0 - sched.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.lr * ratio


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
