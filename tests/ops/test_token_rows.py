"""The dispatch gather and the combine's place-and-sum: exact gradients, each the other's adjoint,
and nothing kept for the backward but the slot ids."""

from __future__ import annotations

import pytest
import torch

from moe_dist.activation_memory import saved_for_backward
from moe_dist.ops.token_rows import gather_token_rows, sum_into_tokens, sum_slot_rows

T, K, H = 5, 3, 4


def _slots(every_slot: bool) -> torch.Tensor:
    """Slot ids in a dispatch order: a permutation of all T*K slots, or some slots left out
    (dropped or unused) in a shuffled order."""
    perm = torch.randperm(T * K, generator=torch.Generator().manual_seed(1))
    return perm if every_slot else perm[: T * K - 4]


@pytest.mark.parametrize("every_slot", [True, False], ids=["all_slots", "some_slots"])
def test_gradcheck_and_adjoint(every_slot: bool) -> None:
    slots = _slots(every_slot)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    y = torch.randn(slots.numel(), H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: gather_token_rows(a, slots, K), [x])
    assert torch.autograd.gradcheck(lambda b: sum_slot_rows(b, slots, T, K), [y])
    # <G x, y> == <x, P y>: the combine is the dispatch gather's adjoint
    lhs = (gather_token_rows(x, slots, K) * y).sum()
    rhs = (x * sum_slot_rows(y, slots, T, K)).sum()
    torch.testing.assert_close(lhs, rhs)
    # the same values as the plain indexing they replace
    torch.testing.assert_close(gather_token_rows(x, slots, K), x[slots // K])
    want = torch.zeros(T * K, H, dtype=torch.float64).index_put((slots,), y).view(T, K, H).sum(1)
    torch.testing.assert_close(sum_slot_rows(y, slots, T, K), want)


@pytest.mark.parametrize("every_slot", [True, False], ids=["all_slots", "some_slots"])
def test_both_backward_sums_agree(every_slot: bool) -> None:
    """The gather's backward: index_add_ on CPU, place and sum in fixed order on GPUs."""
    slots = _slots(every_slot)
    g = torch.randn(slots.numel(), H, dtype=torch.float64)
    torch.testing.assert_close(sum_into_tokens(g, slots, T, K, True), sum_into_tokens(g, slots, T, K, False))


def test_keep_only_the_slot_ids() -> None:
    slots = _slots(True)
    x = torch.randn(T, H, requires_grad=True)
    kept, rows = saved_for_backward(lambda: gather_token_rows(x, slots, K), [x])
    assert kept == slots.numel() * 8  # int64 slot ids, no rows
    kept, _ = saved_for_backward(lambda: sum_slot_rows(rows, slots, T, K), [rows])
    assert kept == slots.numel() * 8


@pytest.mark.slow
@pytest.mark.parametrize("every_slot", [True, False], ids=["all_slots", "some_slots"])
def test_compiled_gather_sum_equals_eager(every_slot: bool) -> None:
    """The place-and-sum as one compiled gather-and-sum kernel (what CUDA runs), fp32 and bf16,
    forward and as the dispatch gather's backward; a new token count reuses the compile."""
    from moe_dist.ops.compiled import compile_failures

    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        slots = _slots(every_slot)
        y = torch.randn(slots.numel(), H).to(dtype)
        want = sum_slot_rows(y, slots, T, K, "eager")
        got = sum_slot_rows(y, slots, T, K, "compiled")
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(
            sum_into_tokens(y, slots, T, K, True, compiled=True).float(), want.float(), rtol=tol, atol=tol
        )
        bigger = torch.randperm(7 * K, generator=torch.Generator().manual_seed(2))[
            : 7 * K - (0 if every_slot else 5)
        ]
        y7 = torch.randn(bigger.numel(), H).to(dtype)
        torch.testing.assert_close(
            sum_slot_rows(y7, bigger, 7, K, "compiled").float(),
            sum_slot_rows(y7, bigger, 7, K, "eager").float(),
        )
    assert not compile_failures(), compile_failures()
