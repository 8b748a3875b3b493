"""Run a function on N real processes with a gloo process group (the multi-rank test harness).

Usage::

    def body(rank: int, world_size: int, arg) -> dict:   # module-level, picklable
        ...                                              # dist is initialised here
        return {"out": tensor}                           # picklable result

    results = run_on_ranks(body, world_size=2, args=(arg,))   # list indexed by rank

Each rank runs with one intra-op thread (2-core machines), a 120 s collective timeout, and its
exception (with traceback) is re-raised in the parent so a failing rank fails the test.

The ranks are forked from a ``forkserver`` that has imported torch and moe_dist's training code
once (``PRELOAD``), not spawned: a spawned rank spends ~3 s of CPU importing them, and the suite
starts a few hundred ranks. The server is started the first time and forks clean copies of
itself (no threads, no process group), so nothing leaks from one test into the next; each rank
takes the parent's environment as it is at the call (the server's own is from its start).
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the fork server (not deepspeed or megatron: they read the environment on import).
PRELOAD = ["torch", "torch.distributed", "moe_dist.training.run", "moe_dist.training.engines"]
_CONTEXT: list[Any] = []


def _context() -> Any:
    if not _CONTEXT:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any, env: dict[str, str]
) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        # Plain pickle: tensors travel by value. The queue's own pickler shares tensor storage
        # through file descriptors, which vanish when this process exits before the parent reads.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 300) -> list[Any]:
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, env))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: list[Any] = [None] * world_size
    errors = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks may now hang in a collective; stop them below
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout_s)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results
