"""The MoE aux terms of one forward: what ``MoELayer`` and ``PluginRouting`` both return as ``aux``.

Shape legend: E experts (global), E1 = E counts + 1 token count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moe_dist.balancing.base import BalancingLoss, Load
from moe_dist.routing.base import Router, Routing


def unique_names(names: list[str]) -> list[str]:
    """Loss names as logged; a name configured twice gets ``_1``, ``_2``... suffixes."""
    out: list[str] = []
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return out


def loss_names(losses: list[BalancingLoss]) -> list[str]:
    """Each loss's registry name (its config name if unregistered), made unique."""
    return unique_names([type(loss).registry_name or loss.cfg.name for loss in losses])


def aux_losses(
    routing: Routing,
    counts_E: torch.Tensor,
    batch_size: int,
    seq_len: int,
    losses: list[BalancingLoss],
    names: list[str],
    router: Router,
    counts_group: Any = None,
    reduce_counts: bool = True,
) -> dict[str, torch.Tensor]:
    """Name -> coefficient-weighted scalar, for every loss and every router-owned term.

    1. ``Load`` from this rank's counts and ``batch_size * seq_len`` tokens.
    2. When a loss ``needs_global_counts``: a copy of the counts and the token count, all-reduced
       over ``counts_group`` (None: the default group) without gradient when ``reduce_counts``
       and a process group is up; otherwise this rank's own.
    3. ``coef * loss(routing, load, router)`` under ``names``.
    4. ``routing.losses`` added under their own keys (summed into a loss of the same name).
    """
    load = Load(counts_E=counts_E, num_tokens=batch_size * seq_len, batch_size=batch_size, seq_len=seq_len)
    if any(loss.needs_global_counts for loss in losses):
        total_E1 = torch.cat([counts_E, counts_E.new_full((1,), float(batch_size * seq_len))])
        if reduce_counts and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total_E1, group=counts_group)
        load.global_counts_E = total_E1[:-1]
        load.global_num_tokens = int(total_E1[-1].item())
    aux = {name: loss.cfg.coef * loss(routing, load, router) for name, loss in zip(names, losses)}
    for name, value in routing.losses.items():
        aux[name] = aux[name] + value if name in aux else value
    return aux
