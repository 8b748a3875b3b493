"""Row-chunk exchange on real gloo processes: both transports (all-to-all, shared memory) against
a Python reference, forward and backward, over a sequence of random plans that grows the
shared-memory outboxes; plus the count exchange and the one-process identity."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_processes import run_on_ranks

from moe_dist.parallel.all_to_all import exchange_counts
from moe_dist.parallel.chunk_exchange import exchange_chunks
from moe_dist.parallel.chunk_plan import ChunkPlan
from moe_dist.parallel.shm_transport import SHM_DIR, ShmTransport

H = 160  # float64 rows of 1.25 kB: a few hundred rows outgrow the first 1 MiB outbox slot
OPS = 6


def _sends(world: int, op: int) -> list[list[tuple[int, int]]]:
    """Every rank's send chunks for operation ``op``: destinations in any order, empty chunks
    included, more rows in later operations."""
    g = torch.Generator().manual_seed(1000 + op)
    sends = []
    for _ in range(world):
        n_chunks = int(torch.randint(1, 6, (1,), generator=g))
        sends.append(
            [
                (
                    int(torch.randint(0, world, (1,), generator=g)),
                    int(torch.randint(0, 60 + 250 * op, (1,), generator=g)),
                )
                for _ in range(n_chunks)
            ]
        )
        sends[-1][0] = (sends[-1][0][0], 0)  # an empty chunk in every plan
    return sends


def _recv_order(
    world: int, op: int, me: int, sends: list[list[tuple[int, int]]]
) -> list[tuple[int, int, int]]:
    """``(source, k, rows)`` of every chunk addressed to ``me``, shuffled but keeping each
    source's chunks in its send order (the ``ChunkPlan`` rule)."""
    mine = [[(s, k, n) for k, (d, n) in enumerate(sends[s]) if d == me] for s in range(world)]
    g = torch.Generator().manual_seed(7 * op + me)
    labels = [s for s in range(world) for _ in mine[s]]
    labels = [labels[i] for i in torch.randperm(len(labels), generator=g).tolist()]
    nxt = [0] * world
    order = []
    for s in labels:
        order.append(mine[s][nxt[s]])
        nxt[s] += 1
    return order


def _rows(src: int, k: int, n: int) -> torch.Tensor:
    """Row i of chunk k of rank src holds src*1e6 + k*1e3 + i + h/1e3 in column h: exact in float64."""
    base = src * 1e6 + k * 1e3 + torch.arange(n, dtype=torch.float64).unsqueeze(1)
    return base + torch.arange(H, dtype=torch.float64) / 1e3


def _row_map(op: int, rank: int, rows: int, extra: int, salt: int) -> tuple[torch.Tensor, int]:
    """A gather/scatter index: ``rows`` distinct positions out of ``rows + extra``."""
    g = torch.Generator().manual_seed(500 + 10 * op + rank + 1000 * salt)
    return torch.randperm(rows + extra, generator=g)[:rows], rows + extra


def _body(rank: int, world: int, use_shm: bool) -> dict:
    shm = ShmTransport.build(dist.group.WORLD) if use_shm else None
    out = []
    for op in range(OPS):
        sends = _sends(world, op)
        order = _recv_order(world, op, rank, sends)
        outgoing = torch.cat([_rows(rank, k, n) for k, (_, n) in enumerate(sends[rank])])
        maps: dict = {}
        x = outgoing
        if op % 2:  # odd operations fold a gather before and a scatter after into the copies
            send_index, in_rows = _row_map(op, rank, outgoing.shape[0], 3, 0)
            recv_index, out_rows = _row_map(op, rank, sum(n for _, _, n in order), 2, 1)
            maps = {
                "send_index": send_index,
                "in_rows": in_rows,
                "recv_index": recv_index,
                "out_rows": out_rows,
            }
            x = torch.full((in_rows, H), -1.0, dtype=torch.float64)
            x[send_index] = outgoing
        plan = ChunkPlan(send=tuple(sends[rank]), recv=tuple((s, n) for s, _, n in order), **maps)
        x.requires_grad_()
        y = exchange_chunks(x, plan, dist.group.WORLD, shm)
        w = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(op * 10 + rank))
        (y * w).sum().backward()
        out.append({"y": y.detach(), "w": w, "grad": x.grad, **maps})
    leftover = None
    if shm is not None:
        dist.barrier()
        shm.close()
        dist.barrier()
        leftover = sorted(p.name for p in SHM_DIR.glob(f"{shm.prefix}*"))
        out.append({"grew": shm.gen})
    return {"ops": out, "leftover": leftover}


@pytest.mark.slow
@pytest.mark.parametrize("use_shm", [False, True], ids=["all_to_all", "shared_memory"])
@pytest.mark.parametrize("world", [2, 3])
def test_exchange_matches_reference_forward_and_backward(world: int, use_shm: bool) -> None:
    results = run_on_ranks(_body, world, (use_shm,))
    for op in range(OPS):
        sends = _sends(world, op)
        res = [results[r]["ops"][op] for r in range(world)]
        landed = {}  # (src, k) -> (receiver, row among the arriving rows)
        arrived_w = []  # per receiver: the weight of each arriving row
        for me in range(world):
            want, row = [], 0
            for s, k, n in _recv_order(world, op, me, sends):
                want.append(_rows(s, k, n))
                landed[(s, k)] = (me, row)
                row += n
            want_y = torch.cat(want) if want else torch.zeros(0, H, dtype=torch.float64)
            w = res[me]["w"]
            if op % 2:  # arriving row j sits at output row recv_index[j]; the other rows are 0
                placed = torch.zeros(res[me]["out_rows"], H, dtype=torch.float64)
                placed[res[me]["recv_index"]] = want_y
                want_y, w = placed, w[res[me]["recv_index"]]
            assert torch.equal(res[me]["y"], want_y), f"op {op} rank {me}"
            arrived_w.append(w)
        for s in range(world):  # gradient of a sent row = the receiver's weight at its place
            want = []
            for k, (_, n) in enumerate(sends[s]):
                me, row = landed[(s, k)]
                want.append(arrived_w[me][row : row + n])
            want_grad = torch.cat(want)
            if op % 2:  # sent row j was input row send_index[j]; unsent input rows get 0
                scattered = torch.zeros(res[s]["in_rows"], H, dtype=torch.float64)
                scattered[res[s]["send_index"]] = want_grad
                want_grad = scattered
            assert torch.equal(res[s]["grad"], want_grad), f"op {op} grad rank {s}"
    if use_shm:
        assert all(r["ops"][-1]["grew"] >= 2 for r in results)  # outboxes were replaced while in use
        assert all(r["leftover"] == [] for r in results)  # nothing left in /dev/shm


def test_count_exchange_and_single_process_identity() -> None:
    counts = torch.tensor([[1, 2]])
    assert torch.equal(exchange_counts(counts, None), counts)
    x = torch.randn(5, 3, requires_grad=True)
    plan = ChunkPlan(send=((0, 2), (0, 3)), recv=((0, 2), (0, 3)))
    y = exchange_chunks(x, plan, None)
    assert torch.equal(y, x) and y.data_ptr() == x.data_ptr()  # no copy
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 3))
    with pytest.raises(ValueError, match="plan takes 5 input rows, tensor has 4"):
        exchange_chunks(torch.zeros(4, 3), plan, None)


def _layer_body(rank: int, world: int, transport: str) -> dict:
    from moe_dist.config import MoEConfig
    from moe_dist.layers.moe_layer import MoELayer
    from moe_dist.parallel.groups import ParallelGroups

    groups = ParallelGroups.build(world, transport)
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=4, router={"name": "topk_softmax", "top_k": 2}, experts={"ffn_hidden_size": 24}
    )
    layer = MoELayer(cfg, 16, groups)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    y, _ = layer(x)
    y.square().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, "grads": grads, "shm": groups.ep_shm is not None}


@pytest.mark.slow
def test_layer_is_bitwise_the_same_over_both_transports() -> None:
    """The transports only copy rows, so an EP=2 layer gives identical outputs and gradients."""
    shm = run_on_ranks(_layer_body, 2, ("auto",))
    a2a = run_on_ranks(_layer_body, 2, ("collective",))
    assert all(r["shm"] for r in shm) and not any(r["shm"] for r in a2a)  # auto picks shm on one host
    for s, c in zip(shm, a2a):
        assert torch.equal(s["y"], c["y"]) and torch.equal(s["dx"], c["dx"])
        assert all(torch.equal(s["grads"][n], c["grads"][n]) for n in c["grads"])


def _two_hosts_body(rank: int, world: int, transport: str) -> str:
    """Ranks that say they run on different hosts (as on two nodes): no shared memory."""
    import moe_dist.parallel.shm_transport as shm_transport
    from moe_dist.config import ConfigError
    from moe_dist.parallel.groups import ParallelGroups

    real = shm_transport._host_facts
    shm_transport._host_facts = lambda: (f"node{rank}", *real()[1:])
    try:
        groups = ParallelGroups.build(world, transport)
    except ConfigError as exc:
        return f"ConfigError: {exc}"
    return "shm" if groups.ep_shm is not None else "collective"


@pytest.mark.slow
def test_transport_choice_across_hosts() -> None:
    assert run_on_ranks(_two_hosts_body, 2, ("auto",)) == ["collective", "collective"]
    for got in run_on_ranks(_two_hosts_body, 2, ("shm",)):
        assert got.startswith("ConfigError") and "parallel.ep_transport" in got
        assert "more than one host" in got
