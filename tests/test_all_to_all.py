"""The differentiable uneven all-to-all on real gloo processes, and its no-op on one process."""

import pytest
import torch
import torch.distributed as dist
from multiprocess import run_on_ranks

from moe_dist.parallel.all_to_all import all_to_all, exchange_counts


def _rows(src: int, dst: int, H: int) -> int:
    return (src + 2 * dst) % 3  # includes empty sends (e.g. 0 -> 0)


def _body(rank: int, world: int, H: int) -> dict:
    send_counts = torch.tensor([_rows(rank, d, H) for d in range(world)])
    recv_counts = exchange_counts(send_counts.reshape(world, 1), dist.group.WORLD).reshape(-1)
    # row value encodes (src, dst, i, h) so every received row is checked exactly
    x = torch.cat(
        [
            torch.tensor(
                [[1000.0 * rank + 100 * d + 10 * i + h for h in range(H)] for i in range(_rows(rank, d, H))]
            ).reshape(-1, H)
            for d in range(world)
        ]
    ).requires_grad_()
    y = all_to_all(x, recv_counts.tolist(), send_counts.tolist(), dist.group.WORLD)
    (y * (rank + 1)).sum().backward()  # grad of a row = (receiver rank + 1)
    return {"recv_counts": recv_counts, "y": y.detach(), "grad": x.grad}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_uneven_all_to_all_forward_backward(world: int) -> None:
    H = 2
    results = run_on_ranks(_body, world, (H,))
    for r, res in enumerate(results):
        assert res["recv_counts"].tolist() == [_rows(s, r, H) for s in range(world)]
        want = [
            [1000.0 * s + 100 * r + 10 * i + h for h in range(H)]
            for s in range(world)
            for i in range(_rows(s, r, H))
        ]
        assert res["y"].reshape(-1, H).tolist() == want
        want_grad = [[float(d + 1)] * H for d in range(world) for _ in range(_rows(r, d, H))]
        assert res["grad"].reshape(-1, H).tolist() == want_grad


def test_single_process_is_identity() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    assert all_to_all(x, [5], [5], None) is x
    counts = torch.tensor([[1, 2]])
    assert torch.equal(exchange_counts(counts, None), counts)
