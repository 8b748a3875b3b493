"""Validation loss over a fixed set of batches, the same number whatever the world size.

Shape legend: B micro-batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_dist.data.batches import TokenBatches
from moe_dist.parallel.groups import ParallelGroups


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: TokenBatches,
    num_batches: int,
    groups: ParallelGroups,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> float:
    """Mean validation loss over batches ``0 .. num_batches - 1``; ``model(x_BS, doc_BS)`` returns
    ``(logits_BSV, aux_loss, aux_terms)``.

    Rank r evaluates batches r, r + W, ...; a rank with none left still runs a forward (weight 0)
    so every EP group issues the same all-to-alls.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, count)
    rounds = math.ceil(num_batches / groups.world_size)
    for r in range(rounds):
        index = r * groups.world_size + groups.rank
        batch = batches.val_batch(index if index < num_batches else 0).to(device)
        with autocast():
            logits_BSV, _, _ = model(batch.x_BS, batch.doc_BS)
        loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), batch.y_BS.flatten())
        if index < num_batches:
            total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if groups.distributed:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])
