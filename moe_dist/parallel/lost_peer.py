"""One line for a collective that failed because a peer is gone, instead of a traceback per rank.

What the surviving ranks see (gloo on CPU, measured between two hosts in network namespaces,
``tests/launch/test_multihost_faults.py``):

- A peer's processes die but its machine lives (a crash, an OOM kill, ``kill -9``): its kernel
  resets the sockets and gloo raises at once, naming the peer's address:
  ``[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:40109`` or
  ``Read error [10.0.0.2]:17541: Connection reset by peer``.
- A peer is unreachable (a partition, a machine that lost power): nothing comes back, and gloo
  raises after ``parallel.timeout_s`` without an address: ``Timed out waiting 15000ms for recv
  operation to complete``. NCCL's watchdog says ``Watchdog caught collective operation timeout``.

``lost_peer_message(exc)`` recognises these (following ``__cause__`` and ``__context__``) and
returns one line: who saw it, the peer's address when the error names one, and what to do. Any
other exception gives None and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import socket

import torch.distributed as dist

_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)")
_PEER_GONE = [  # the most specific first: "Read error [ADDR]:PORT: Connection reset by peer"
    re.compile(p, re.I)
    for p in (r"Connection (?:closed|reset) by peer", r"Broken pipe", r"(?:Read|Write) error")
]
_TIMED_OUT = re.compile(
    r"Timed out waiting (\d+)ms for (?:recv|send) operation|Watchdog caught collective operation timeout"
    r"|NCCL communicator was aborted"
)
_RESUME = "the job stops; start it again with `train --resume` (launch max_restarts does it for you)"


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def _who() -> str:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else os.environ.get("RANK", "?")
    return f"rank {rank} on {socket.gethostname()}"


def lost_peer_message(exc: BaseException) -> str | None:
    """One line if ``exc`` is a collective that failed on a lost peer, else None (module doc)."""
    for e in _chain(exc):
        text = str(e)
        if not isinstance(e, RuntimeError):  # gloo, NCCL and the store raise RuntimeError subclasses
            continue
        gone = next((m for p in _PEER_GONE if (m := p.search(text))), None)
        if gone and (where := _ADDRESS.search(text)):
            why = gone.group(0).lower()
            return f"{_who()} lost its peer {where.group(1)} ({why}) in a collective; {_RESUME}"
        if m := _TIMED_OUT.search(text):
            waited = f" within {int(m.group(1)) / 1000:g} s (parallel.timeout_s)" if m.group(1) else ""
            return (
                f"{_who()}: a collective got no answer{waited}: a peer died or the network is "
                f"partitioned; {_RESUME}"
            )
    return None
