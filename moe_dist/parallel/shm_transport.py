"""Row exchange through shared memory for a gloo group whose ranks all run on this host.

Why: gloo moves an all-to-all through loopback TCP, and most of an exchange's time is CPU time in
the socket stack, several times what a copy of the same bytes costs (figures in
docs/performance.md). Here each byte is copied once into the sender's outbox and once
out of it, straight to its place in the receiver's output (``ChunkPlan`` order), so the
dispatcher needs no reorder pass either.

Layout: every rank owns an outbox, a file in ``/dev/shm`` mapped by all ranks of the group:
``[2 halves, R - 1 peer slots, slot_bytes]``. Operation n uses half ``n % 2``; the rows for peer
d go to d's slot, d's chunks back to back in send order. A small meta file per rank holds, per
half, ``(generation, slot_bytes)`` of the outbox that half's data is in.

One operation: (1) write: grow the outbox if a slot is too small (a new file, generation + 1),
copy the outgoing chunks, publish the meta of this half; (2) one barrier of the group; (3) read:
map any peer outbox whose generation changed, copy the incoming chunks into the output.

Why it is safe without a second barrier: a rank writes half ``n % 2`` only after the barrier of
operation n - 1, which every rank passed only after finishing its reads of operation n - 2, the
last user of that half. Meta is per half for the same reason. A grown outbox is a new file, so
peers still reading the old one are unaffected; each file is unlinked one barrier after its
creation, when every peer has mapped it, so nothing is left in ``/dev/shm`` after a normal run
(a crash inside that window can leave one file per rank, named ``moe_dist_*``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import socket
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist.parallel.chunk_plan import ChunkPlan, chunk_spans, rows_per_peer

SHM_DIR = Path("/dev/shm")
_ALIGN = 4096


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _map(path: Path, nbytes: int) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)


def _create(path: Path, nbytes: int) -> torch.Tensor:
    """A new shared file of ``nbytes``, its pages reserved now: a full ``/dev/shm`` fails here
    with a message instead of a SIGBUS at the first write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        fs = os.statvfs(SHM_DIR)
        free = fs.f_bavail * fs.f_frsize
        raise RuntimeError(
            f"shared-memory all-to-all: cannot reserve {nbytes / 2**20:.1f} MiB in {SHM_DIR} "
            f"({free / 2**20:.1f} MiB free): {exc.strerror}. Give the container more shared memory "
            "(docker --shm-size) or set parallel.ep_transport: collective"
        ) from exc
    os.close(fd)
    return _map(path, nbytes)


def _meta_view(page: torch.Tensor) -> torch.Tensor:
    """int64 ``[2 halves, (generation, slot_bytes)]`` at the start of a meta page."""
    return page.view(torch.int64)[:4].view(2, 2)


def _host_facts() -> tuple[str, str, bool]:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return socket.gethostname(), boot_id, SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def shm_unavailable_reason(group: dist.ProcessGroup) -> str | None:
    """None when every rank of ``group`` can share memory with every other (collective: all
    ranks of the group call it and get the same answer), else why not."""
    if dist.get_backend(group) != "gloo":
        return f"the group's backend is {dist.get_backend(group)}, not gloo"
    facts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(facts, _host_facts(), group=group)
    if len({(host, boot) for host, boot, _ in facts}) > 1:
        return "the group's ranks run on more than one host"
    if not all(ok for _, _, ok in facts):
        return f"{SHM_DIR} is missing or not writable"
    return None


class ShmTransport:
    """Moves ``ChunkPlan`` chunks between the ranks of one same-host gloo group (see module
    docstring). Build it with ``ShmTransport.build(group)`` on every rank of the group."""

    def __init__(self, group: dist.ProcessGroup, prefix: str) -> None:
        self.group, self.prefix = group, prefix
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.seq = 0  # operations so far: picks the half
        self.gen, self.slot_bytes = 0, 0
        self.outbox: torch.Tensor | None = None  # uint8 [2, R - 1, slot_bytes]
        self.created: list[Path] = []  # files made in this operation: unlinked after the next barrier
        self.to_unlink: list[Path] = []
        self.meta = _meta_view(_create(self._meta_path(self.rank), _ALIGN))
        self.meta.zero_()
        self.peer_meta: dict[int, torch.Tensor] = {}
        self.peer_gen: dict[int, int] = {}
        self.peer_box: dict[int, torch.Tensor] = {}
        # Also runs at interpreter exit: no file of ours outlives a normal run.
        self._finalizer = weakref.finalize(
            self, _unlink_all, [self._meta_path(self.rank)], self.created, self.to_unlink
        )

    @classmethod
    def build(cls, group: dist.ProcessGroup) -> ShmTransport:
        """Collective over ``group``: agree on a name, map every rank's meta file, check that
        every rank succeeded (else every rank raises the same ``RuntimeError``)."""
        name = [f"moe_dist_{os.getpid()}_{secrets.token_hex(4)}"]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        transport, error = None, None
        try:
            transport = cls(group, name[0])
        except (OSError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        dist.barrier(group=group)
        if transport is not None:
            try:
                for peer in range(transport.size):
                    if peer != transport.rank:
                        transport.peer_meta[peer] = _meta_view(_map(transport._meta_path(peer), _ALIGN))
            except (OSError, RuntimeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        errors: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)  # also: every rank has mapped every meta
        if transport is not None:
            transport._meta_path(transport.rank).unlink(missing_ok=True)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            if transport is not None:
                transport.close()
            raise RuntimeError(f"shared-memory all-to-all: rank {failed[0][0]} of the group: {failed[0][1]}")
        assert transport is not None
        return transport

    def _meta_path(self, rank: int) -> Path:
        return SHM_DIR / f"{self.prefix}_r{rank}_meta"

    def _box_path(self, rank: int, gen: int) -> Path:
        return SHM_DIR / f"{self.prefix}_r{rank}_g{gen}"

    def _slot_of(self, dest: int, owner: int) -> int:
        """Index of ``dest``'s slot in ``owner``'s outbox (the owner has no slot of its own)."""
        return dest if dest < owner else dest - 1

    def _grow(self, need_bytes: int) -> None:
        slot = _round_up(max(need_bytes + need_bytes // 4, 1 << 20), _ALIGN)
        gen = self.gen + 1
        path = self._box_path(self.rank, gen)
        box = _create(path, 2 * (self.size - 1) * slot)
        self.created.append(path)
        self.outbox, self.gen, self.slot_bytes = box.view(2, self.size - 1, slot), gen, slot

    def move(self, x_XH: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
        """Send ``x_XH``'s chunks per ``plan.send``, return the received ones in ``plan.recv``
        order (no autograd; ``chunk_exchange.exchange_chunks`` wraps it)."""
        if x_XH.device.type != "cpu":  # gloo ranks sharing one GPU: the shared memory is host memory
            host_plan = dataclasses.replace(
                plan,
                send_index=None if plan.send_index is None else plan.send_index.cpu(),
                recv_index=None if plan.recv_index is None else plan.recv_index.cpu(),
            )
            return self.move(x_XH.cpu(), host_plan).to(x_XH.device)
        me, half = self.rank, self.seq % 2
        self.seq += 1
        x_XH = x_XH.contiguous()
        row_shape, dtype = x_XH.shape[1:], x_XH.dtype
        row_bytes = math.prod(row_shape) * x_XH.element_size()
        # 1. write
        rows_to = rows_per_peer(plan.send, self.size)
        need = max((rows_to[d] for d in range(self.size) if d != me), default=0) * row_bytes
        if need > self.slot_bytes:
            self._grow(need)
        own: list[torch.Tensor] = []  # this rank's chunks to itself: copied once, at read time
        for d, row, peer_row, n in chunk_spans(plan.send):
            if d == me:
                own.append(self._outgoing(x_XH, plan, row, n))
            elif n:
                assert self.outbox is not None
                start = peer_row * row_bytes
                slot_nH = self.outbox[half, self._slot_of(d, me), start : start + n * row_bytes]
                slot_nH = slot_nH.view(dtype).view(n, *row_shape)
                if plan.send_index is None:
                    slot_nH.copy_(x_XH[row : row + n])
                else:  # the gather before the exchange, straight into the outbox
                    torch.index_select(x_XH, 0, plan.send_index[row : row + n], out=slot_nH)
        self.meta[half, 0], self.meta[half, 1] = self.gen, self.slot_bytes
        # 2. barrier: every rank's chunks and meta are in place
        dist.barrier(group=self.group)
        for path in self.to_unlink:  # made one barrier ago: every peer has mapped them
            path.unlink(missing_ok=True)
        self.to_unlink[:] = self.created
        self.created.clear()
        for peer in self.peer_meta:
            self._map_peer(peer, half)
        # 3. read
        if plan.recv_index is None:
            y_YH = x_XH.new_empty((plan.recv_rows, *row_shape))
        elif plan.output_rows > plan.recv_rows:  # the scatter after the exchange; unsent rows are 0
            y_YH = x_XH.new_zeros((plan.output_rows, *row_shape))
        else:
            y_YH = x_XH.new_empty((plan.output_rows, *row_shape))
        own_next = 0
        for s, row, peer_row, n in chunk_spans(plan.recv):
            if s == me:
                src = own[own_next]
                own_next += 1
            elif n:
                start = peer_row * row_bytes
                box = self.peer_box[s][half, self._slot_of(me, s), start : start + n * row_bytes]
                src = box.view(dtype).view(n, *row_shape)
            if n and plan.recv_index is None:
                y_YH[row : row + n].copy_(src)
            elif n:
                y_YH.index_copy_(0, plan.recv_index[row : row + n], src)
        return y_YH

    @staticmethod
    def _outgoing(x_XH: torch.Tensor, plan: ChunkPlan, row: int, n: int) -> torch.Tensor:
        """Outgoing rows ``row .. row + n`` of ``plan.send`` (a view, or a gather by ``send_index``)."""
        if plan.send_index is None:
            return x_XH[row : row + n]
        return x_XH.index_select(0, plan.send_index[row : row + n])

    def _map_peer(self, peer: int, half: int) -> None:
        gen, slot = (int(v) for v in self.peer_meta[peer][half].tolist())
        if gen == 0 or gen == self.peer_gen.get(peer):
            return
        path = self._box_path(peer, gen)
        try:
            box = _map(path, 2 * (self.size - 1) * slot)
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(
                f"shared-memory all-to-all: rank {peer} of the EP group removed its outbox {path} "
                f"before rank {self.rank} mapped it (did rank {peer} exit early?): {exc}"
            ) from exc
        self.peer_box[peer] = box.view(2, self.size - 1, slot)
        self.peer_gen[peer] = gen

    def close(self) -> None:
        self._finalizer()


def _unlink_all(*path_lists: list[Path]) -> None:
    for paths in path_lists:
        for path in paths:
            path.unlink(missing_ok=True)
