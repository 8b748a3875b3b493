"""The chunk plan's index maths, exact, without processes: the worked layout of
``moe_dist/parallel/chunk_plan.py``, a reversed plan, and every order against a brute-force
reading of the rows.

Shape legend: X rows this rank sends, Y rows it receives, H row width.
"""

from __future__ import annotations

import torch

from moe_dist.parallel.chunk_plan import (
    ChunkPlan,
    ChunkSpan,
    arrival_order,
    chunk_spans,
    peer_major_order,
    rows_per_peer,
)

# Rank 0 of the dispatcher on R = 2 ranks, e = 2 local experts (the module docstring's layout).
SEND = ((0, 3), (0, 1), (1, 2), (1, 4))
RECV = ((0, 3), (1, 5), (0, 1), (1, 6))  # expert-major: (e0,r0) (e0,r1) (e1,r0) (e1,r1)


def test_worked_layout_of_the_dispatcher() -> None:
    assert rows_per_peer(SEND, 2) == [4, 6]
    assert rows_per_peer(RECV, 2) == [4, 11]
    assert rows_per_peer(RECV, 3) == [4, 11, 0]  # a peer without chunks exchanges nothing
    assert chunk_spans(RECV) == [
        ChunkSpan(peer=0, row=0, peer_row=0, rows=3),
        ChunkSpan(peer=1, row=3, peer_row=0, rows=5),
        ChunkSpan(peer=0, row=8, peer_row=3, rows=1),
        ChunkSpan(peer=1, row=9, peer_row=5, rows=6),
    ]
    assert peer_major_order(SEND) == [0, 1, 2, 3]  # expert-sorted chunks are already grouped by rank
    assert peer_major_order(RECV) == [0, 2, 1, 3]
    assert arrival_order(RECV) == [0, 2, 1, 3]


def test_orders_are_inverse_and_stable_with_empty_chunks() -> None:
    chunks = ((2, 4), (0, 0), (1, 3), (0, 2), (2, 0), (1, 1))
    assert peer_major_order(chunks) == [1, 3, 2, 5, 0, 4]  # within a peer: plan order
    order, position = peer_major_order(chunks), arrival_order(chunks)
    assert [position[j] for j in order] == list(range(len(chunks)))
    assert [order[i] for i in position] == list(range(len(chunks)))
    assert [s.peer_row for s in chunk_spans(chunks)] == [0, 0, 0, 0, 4, 3]
    assert peer_major_order(()) == [] and arrival_order(()) == [] and chunk_spans(()) == []


def test_spans_and_orders_match_the_rows_an_all_to_all_delivers() -> None:
    """Label every arriving row (peer, index among that peer's rows), lay them out peer-major
    as an all-to-all delivers them, and read each chunk back through the plan's maths."""
    g = torch.Generator().manual_seed(0)
    R = 3
    chunks = tuple(
        (int(torch.randint(0, R, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g)))
        for _ in range(9)
    )
    per_peer = rows_per_peer(chunks, R)
    delivered = [(p, i) for p in range(R) for i in range(per_peer[p])]  # source-major
    starts = [sum(per_peer[:p]) for p in range(R)]
    # plan order, brute force: the k-th chunk from p holds p's next rows
    taken, want = [0] * R, []
    for p, n in chunks:
        want += [(p, taken[p] + i) for i in range(n)]
        taken[p] += n
    spans = chunk_spans(chunks)
    got = [delivered[starts[s.peer] + s.peer_row + i] for s in spans for i in range(s.rows)]
    assert got == want
    assert [want[s.row] for s in spans if s.rows] == [(s.peer, s.peer_row) for s in spans if s.rows]
    # the collective's route: split the delivered rows into peer-major chunks, take arrival_order
    sizes = [chunks[j][1] for j in peer_major_order(chunks)]
    pieces, at = [], 0
    for n in sizes:
        pieces.append(delivered[at : at + n])
        at += n
    assert [row for i in arrival_order(chunks) for row in pieces[i]] == want


def test_reverse_and_row_maps() -> None:
    send_index, recv_index = torch.tensor([4, 0, 2]), torch.tensor([1, 3])
    plan = ChunkPlan(((1, 2), (0, 1)), ((0, 2),), send_index, 5, recv_index, 4)
    assert (plan.send_rows, plan.recv_rows, plan.input_rows, plan.output_rows) == (3, 2, 5, 4)
    back = plan.reverse()
    assert back.send == plan.recv and back.recv == plan.send
    assert back.send_index is recv_index and back.recv_index is send_index
    assert (back.input_rows, back.output_rows) == (4, 5)
    again = back.reverse()
    assert (again.send, again.recv, again.in_rows, again.out_rows) == (plan.send, plan.recv, 5, 4)
    assert again.send_index is send_index and again.recv_index is recv_index
    # place: arriving rows to their output rows, zeros elsewhere
    y_YH = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert plan.place(y_YH).tolist() == [[0, 0], [1, 1], [0, 0], [2, 2]]
    plain = ChunkPlan(((0, 2),), ((0, 2),))
    assert plain.place(y_YH) is y_YH and plain.input_rows == plain.output_rows == 2
    # a permutation (no unsent rows) fills every output row
    perm = ChunkPlan(((0, 2),), ((0, 2),), recv_index=torch.tensor([1, 0]), out_rows=2)
    assert perm.place(y_YH).tolist() == [[2, 2], [1, 1]]
