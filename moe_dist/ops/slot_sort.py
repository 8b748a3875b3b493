"""Pure index maths of token dispatch: slot sorting and capacity drops.

Shape legend: T tokens on this rank, K slots per token, S = T * K token-slots, E experts
(global), e local experts per EP rank, R EP ranks, X rows actually dispatched (kept slots).

A token-slot ``s = t * K + k`` is token ``t``'s ``k``-th routing choice. Everything here is a
function of integer tensors only, so it is tested exactly without processes
(tests/ops/test_permute.py).

Worked layout, E = 4 experts on R = 2 EP ranks (e = 2: rank 0 hosts e0, e1; rank 1 hosts e2, e3):

1. ``sort_slots`` orders this rank's slots by global expert id, stable, so the send buffer is
   already grouped by destination rank: ``[e0 | e1 | e2 | e3]`` = ``[to r0 | to r1]``.
2. After the all-to-all, rank 0 holds what every source rank sent to its experts, **rank-major**::

       (e0,r0) (e1,r0) | (e0,r1) (e1,r1)        chunks in the order (source rank, local expert)

3. The grouped GEMM needs **expert-major** order; the exchange's ``ChunkPlan`` lays the chunks
   out that way as they arrive (``moe_dist/parallel/chunk_plan.py``)::

       (e0,r0) (e0,r1) | (e1,r0) (e1,r1)

4. On the way back the reversed plan is the exact inverse.
"""

from __future__ import annotations

import math

import torch


def capacity_per_expert(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots one expert accepts from one rank: ``ceil(capacity_factor * T * K / E)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def count_ids(ids_N: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ``ids_N`` (int64). Unlike ``bincount``, no host sync on
    CUDA (bincount reads the max id back to size its output)."""
    return torch.zeros(n, dtype=torch.int64, device=ids_N.device).scatter_add_(
        0, ids_N, torch.ones_like(ids_N)
    )


def sort_slots(
    experts_S: torch.Tensor,
    num_experts: int,
    weights_S: torch.Tensor | None = None,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order token-slots by expert; returns ``(order_S, kept_counts_E)``.

    ``order_S`` is a permutation of the S slot ids: first the kept slots sorted by global expert
    id and, inside one expert, by slot id (token order; stable sort, so deterministic), then all
    unused (``-1``) and dropped slots. The first ``kept_counts_E.sum()`` entries are the slots
    to dispatch; ``kept_counts_E[i]`` of them go to expert ``i``.

    Drop policy (only when ``capacity`` is given): expert ``i`` keeps at most ``capacity`` of
    this rank's slots, those with the **highest router weight**, ties broken by **lower slot id**
    (earlier token first). A dropped slot contributes 0 to its token's output: the token keeps
    its other experts, and the residual stream carries it. No host synchronisation here.
    """
    S = experts_S.shape[0]
    key_S = torch.where(experts_S < 0, torch.full_like(experts_S, num_experts), experts_S)
    if capacity is not None:
        if weights_S is None:
            raise ValueError("sort_slots: a capacity needs the slots' router weights to pick which to keep")
        # Expert-major, weight-descending inside an expert, slot order among equal weights.
        by_weight_S = torch.argsort(weights_S.detach(), descending=True, stable=True)
        ranked_S = by_weight_S[torch.argsort(key_S[by_weight_S], stable=True)]
        routed_counts_E1 = count_ids(key_S, num_experts + 1)
        starts_E1 = torch.cumsum(routed_counts_E1, 0) - routed_counts_E1
        position_S = torch.arange(S, device=experts_S.device) - starts_E1[key_S[ranked_S]]
        # Dropped slots get the unused key, so they sort last with the -1 slots (a scatter, not
        # boolean indexing: no host sync).
        ranked_key_S = torch.where(position_S >= capacity, num_experts, key_S[ranked_S])
        key_S = key_S.scatter(0, ranked_S, ranked_key_S)
    order_S = torch.argsort(key_S, stable=True)
    kept_counts_E = count_ids(key_S, num_experts + 1)[:num_experts]
    return order_S, kept_counts_E
