"""A network link with delay and loss, made in user space: two TAP devices and a relay between them.

The kernels these tests run on are built without ``sch_netem`` (``CONFIG_NET_SCH_NETEM`` is not
set and modules cannot be loaded), so ``tc qdisc add ... netem delay 20ms loss 1%`` fails with
"Specified qdisc kind is unknown". This relay gives the same impairment on every kernel that
has TUN/TAP:

1. Create two TAP devices (``IFF_TAP | IFF_NO_PI``: whole Ethernet frames, no header) in the
   root namespace and print ``ready``; the caller moves each into one host's namespace.
2. Forever: pass frames between the devices. A frame that leaves B (host 1) is dropped with
   probability ``loss`` (netem's ``loss random``), else delivered ``delay_ms`` later (netem's
   fixed ``delay``); frames from A pass at once. That is ``tc qdisc add dev IF root netem
   delay 20ms loss 1%`` on host 1's interface: the round trip grows by ``delay_ms``.

Frames keep their order in each direction (a fixed delay). The devices vanish when the relay
exits, so killing the relay removes the link. Run as ``python link_relay.py TAP_A TAP_B
DELAY_MS LOSS SEED`` (root: ``/dev/net/tun``).
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def relay(a: int, b: int, delay_s: float, loss: float, seed: int) -> None:
    """Frames from ``a`` to ``b`` at once; from ``b`` to ``a`` delayed and lossy."""
    rng = random.Random(seed)
    due: list[tuple[float, int, int, bytes]] = []  # (deliver at, sequence, device, frame)
    seq = 0
    while True:
        wait = max(0.0, due[0][0] - time.monotonic()) if due else None
        ready, _, _ = select.select([a, b], [], [], wait)
        for fd in ready:
            try:
                frame = os.read(fd, 65536)
            except OSError:  # the device is down: nothing to read
                continue
            if fd == a:
                with contextlib.suppress(OSError):  # the receiving side is down: lost, as on a cut cable
                    os.write(b, frame)
            elif rng.random() >= loss:
                seq += 1
                heapq.heappush(due, (time.monotonic() + delay_s, seq, a, frame))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, fd, frame = heapq.heappop(due)
            try:
                os.write(fd, frame)
            except OSError:  # the receiving side is down: the frame is lost, as on a cut cable
                pass


def main(argv: list[str]) -> None:
    name_a, name_b, delay_ms, loss, seed = argv
    a, b = open_tap(name_a), open_tap(name_b)
    print("ready", flush=True)
    relay(a, b, float(delay_ms) / 1000, float(loss), int(seed))


if __name__ == "__main__":
    main(sys.argv[1:])
