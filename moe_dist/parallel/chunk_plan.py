"""Which rows go to which peer in which chunk: the index maths of a row-chunk exchange.

Shape legend: X rows this rank sends, Y rows it receives, H row width (hidden size), R ranks.

Pure functions (no process group), shared by both transports (``chunk_exchange.collective_move``
and ``shm_transport.ShmTransport``) and tested without processes. Worked layout, the token
dispatcher on R = 2 ranks with e = 2 local experts (4 global experts), seen from rank 0, which
sends 3, 1, 2, 4 rows to experts 0..3 and receives 5, 6 rows for its experts 0, 1 from rank 1::

    send = (0, 3) (0, 1) (1, 2) (1, 4)      one chunk per global expert: (destination, rows)
    recv = (0, 3) (1, 5) (0, 1) (1, 6)      expert-major: (e0,r0) (e0,r1) (e1,r0) (e1,r1)

1. ``rows_per_peer``: rows to each peer, ``[4, 6]``; from each peer, ``[4, 11]`` (the splits of
   one ``all_to_all_single``).
2. ``chunk_spans``: each chunk's first row among this rank's rows and among the rows it shares
   with that peer. Receiving: ``(peer 0, row 0, peer row 0)``, ``(1, 3, 0)``, ``(0, 8, 3)``,
   ``(1, 9, 5)``: rank 1's second chunk to me starts at row 5 of what rank 1 sends me.
3. ``peer_major_order``: the chunks grouped by peer, each peer's in plan order: ``[0, 2, 1, 3]``
   for ``recv`` (an all-to-all delivers them so); ``arrival_order`` is its inverse, the
   position of each plan chunk among them: ``[0, 2, 1, 3]`` here (a swap is its own inverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

Chunks = tuple[tuple[int, int], ...]  # (peer rank, rows) per chunk


class ChunkSpan(NamedTuple):
    """Where one chunk's rows are: ``row`` among this rank's outgoing (or arriving) rows,
    ``peer_row`` among the rows it exchanges with ``peer``."""

    peer: int
    row: int
    peer_row: int
    rows: int


def rows_per_peer(chunks: Chunks, world: int) -> list[int]:
    """Rows exchanged with each of the ``world`` peers, summed over their chunks."""
    out = [0] * world
    for peer, n in chunks:
        out[peer] += n
    return out


def chunk_spans(chunks: Chunks) -> list[ChunkSpan]:
    """Each chunk's first row overall and among the rows of its peer (chunks back to back)."""
    spans, row, peer_row = [], 0, {}
    for peer, n in chunks:
        spans.append(ChunkSpan(peer, row, peer_row.get(peer, 0), n))
        peer_row[peer] = peer_row.get(peer, 0) + n
        row += n
    return spans


def peer_major_order(chunks: Chunks) -> list[int]:
    """Chunk indices grouped by peer (ascending), each peer's chunks in their plan order."""
    return sorted(range(len(chunks)), key=lambda i: chunks[i][0])  # sorted() is stable


def arrival_order(chunks: Chunks) -> list[int]:
    """For each chunk of the plan, its position in ``peer_major_order`` (the inverse permutation)."""
    position = [0] * len(chunks)
    for i, j in enumerate(peer_major_order(chunks)):
        position[j] = i
    return position


@dataclass(frozen=True)
class ChunkPlan:
    """``send``: ``(destination rank, rows)`` per outgoing chunk, in sending order.
    ``recv``: ``(source rank, rows)`` per incoming chunk, in arrival order.

    The k-th ``recv`` entry naming source s is the k-th chunk s sends to this rank, so the
    entries from one source appear in the order that source sends them.

    Optional row maps fold a gather before and a scatter after the exchange into its copies:
    ``send_index`` (S rows) picks the outgoing rows from an input of ``in_rows`` rows (None: the
    input is the outgoing rows in order); ``recv_index`` (R rows) places the arriving rows in an
    output of ``out_rows`` rows, zeros elsewhere (None: the output is the arriving rows in order).
    """

    send: Chunks
    recv: Chunks
    send_index: torch.Tensor | None = None
    in_rows: int | None = None
    recv_index: torch.Tensor | None = None
    out_rows: int | None = None

    def reverse(self) -> ChunkPlan:
        """The plan that moves every output row back to where it came from."""
        return ChunkPlan(
            send=self.recv,
            recv=self.send,
            send_index=self.recv_index,
            in_rows=self.out_rows,
            recv_index=self.send_index,
            out_rows=self.in_rows,
        )

    @property
    def send_rows(self) -> int:
        return sum(n for _, n in self.send)

    @property
    def recv_rows(self) -> int:
        return sum(n for _, n in self.recv)

    @property
    def input_rows(self) -> int:
        return self.send_rows if self.send_index is None else int(self.in_rows or 0)

    @property
    def output_rows(self) -> int:
        return self.recv_rows if self.recv_index is None else int(self.out_rows or 0)

    def place(self, y_YH: torch.Tensor) -> torch.Tensor:
        """The arriving rows at their output rows (``recv_index``), zeros elsewhere."""
        if self.recv_index is None:
            return y_YH
        out = (
            y_YH.new_zeros((self.output_rows, *y_YH.shape[1:]))
            if self.output_rows > y_YH.shape[0]
            else (y_YH.new_empty((self.output_rows, *y_YH.shape[1:])))
        )
        return out.index_copy_(0, self.recv_index, y_YH)
