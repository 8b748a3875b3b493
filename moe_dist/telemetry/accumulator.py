"""Step statistics accumulated on the device, fetched to the host every N steps without a sync.

Shape legend: L MoE layers, E experts (global), e local experts, A aux-loss terms, P payload length.

Every step the per-layer tensors of the step are concatenated into one device vector and added to
a running sum (a few tiny kernels, no host transfer). Every ``interval_steps`` the sum, plus the
last step's aux losses and router bias spreads, is copied in ONE ``non_blocking`` transfer into a
pinned host buffer (CUDA), an event is recorded, and the buffer goes to the publisher thread,
which waits on the event, not the training thread. On CPU the copy is a plain memcpy.
Two host buffers alternate; if both are still in use the sum simply keeps growing until the next
interval (nothing is lost, the interval is counted as deferred).

Payload layout (float64 on the host): ``counts_LE | received_LE | dropped_L | local_received_L |
aux_LA | bias_spread_L`` where the first four are sums over the interval and the last two are the
values of the interval's last step.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_dist.layers.gate import HasGate
    from moe_dist.training.step_hook import StepCounts


@dataclass
class HostSnapshot:
    """One interval, on the host, ready to publish."""

    L: int
    E: int
    aux_names: list[str]
    payload_P: torch.Tensor  # noqa: N815 - float64 CPU; layout in the module docstring
    ready: torch.cuda.Event | None  # wait on it before reading the payload
    steps: int  # steps in the interval
    last_step: int
    step_seconds: float
    tokens: int
    a2a_seconds: float
    expert_seconds: float
    timestamp: float
    losses: dict[str, float] = field(default_factory=dict)
    release: threading.Semaphore | None = None

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def views(self) -> dict[str, torch.Tensor]:
        L, E, A, p = self.L, self.E, len(self.aux_names), self.payload_P
        sizes = {
            "counts_LE": L * E,
            "received_LE": L * E,
            "dropped_L": L,
            "local_received_L": L,
            "aux_LA": L * A,
            "bias_spread_L": L,
        }
        out, at = {}, 0
        for name, n in sizes.items():
            out[name] = p[at : at + n]
            at += n
        out["counts_LE"] = out["counts_LE"].view(L, E)
        out["received_LE"] = out["received_LE"].view(L, E)
        out["aux_LA"] = out["aux_LA"].view(L, A)
        return out


def bias_spread(router: torch.nn.Module) -> torch.Tensor | None:
    """max - min of an aux-loss-free router's per-expert bias buffer, on the device; None if none."""
    for name in ("expert_bias_E", "bias"):
        b = getattr(router, name, None)
        if isinstance(b, torch.Tensor) and b.dim() == 1 and b.numel() > 1:
            return (b.max() - b.min()).detach().to(torch.float32)
    return None


class StatsAccumulator:
    def __init__(self, interval_steps: int) -> None:
        self.interval = interval_steps
        self.sum_P: torch.Tensor | None = None
        self.L = self.E = 0
        self.aux_names: list[str] = []
        self.host_buffers: list[torch.Tensor] = []
        self.free = threading.Semaphore(2)
        self._reset_host_totals()

    def _reset_host_totals(self) -> None:
        self.steps = 0
        self.step_seconds = 0.0
        self.tokens = 0
        self.a2a_seconds = 0.0
        self.expert_seconds = 0.0

    def add(self, inputs: StepCounts, step_seconds: float, tokens: int) -> None:
        """Fold one step into the device sum (no host sync)."""
        with torch.no_grad():
            vec = torch.cat(
                [
                    torch.stack(inputs.counts_E).reshape(-1),
                    torch.stack(inputs.received_E).reshape(-1),
                    torch.stack([d.reshape(()) for d in inputs.dropped]),
                    torch.stack([r.reshape(()) for r in inputs.local_received]),
                ]
            ).to(torch.float64)
            if self.sum_P is None:
                self.L, self.E = len(inputs.counts_E), inputs.counts_E[0].numel()
                self.sum_P = torch.zeros_like(vec)
            self.sum_P.add_(vec)
        self.steps += 1
        self.step_seconds += step_seconds
        self.tokens += tokens
        self.a2a_seconds += inputs.a2a_seconds
        self.expert_seconds += inputs.expert_seconds

    def due(self, step: int) -> bool:
        return self.steps > 0 and step % self.interval == 0

    def snapshot(
        self, layers: Sequence[HasGate], step: int, losses: dict[str, float], force: bool = False
    ) -> HostSnapshot | None:
        """Start the asynchronous fetch of the interval; None when both host buffers are busy
        (then the sums keep growing into the next interval; ``force`` waits for a buffer)."""
        assert self.sum_P is not None
        if not self.free.acquire(blocking=force):
            return None
        try:
            host, ready = self._fetch(layers)
        except BaseException:
            self.free.release()  # do not leak the buffer permit
            raise
        snap = HostSnapshot(
            L=self.L,
            E=self.E,
            aux_names=list(self.aux_names),
            payload_P=host,
            ready=ready,
            steps=self.steps,
            last_step=step,
            step_seconds=self.step_seconds,
            tokens=self.tokens,
            a2a_seconds=self.a2a_seconds,
            expert_seconds=self.expert_seconds,
            timestamp=time.time(),
            losses=dict(losses),
            release=self.free,
        )
        self._reset_host_totals()
        return snap

    @torch.no_grad()
    def _fetch(self, layers: Sequence[HasGate]) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Sums + last aux values + bias spreads -> one host buffer, one (async on CUDA) copy."""
        assert self.sum_P is not None
        if not self.aux_names and layers:
            self.aux_names = sorted(layers[0].gate.last_aux)
        dev = self.sum_P.device
        nan = torch.full((), math.nan, device=dev, dtype=torch.float64)
        # Layers the caller did not pass (or values they lack) read as NaN: "not known".
        gates = [layer.gate for layer in layers] if len(layers) == self.L else [None] * self.L
        aux, spreads = [], []
        for gate in gates:
            last_aux = gate.last_aux if gate is not None else {}
            aux += [
                last_aux[n].detach().reshape(()).to(dev, torch.float64) if n in last_aux else nan
                for n in self.aux_names
            ]
            s = bias_spread(gate.router) if gate is not None else None
            spreads.append(nan if s is None else s.to(dev, torch.float64))
        payload = torch.cat([self.sum_P, torch.stack(aux) if aux else self.sum_P[:0], torch.stack(spreads)])
        host = self._host_buffer(payload)
        ready = None
        if payload.is_cuda:
            host.copy_(payload, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host.copy_(payload)
        self.sum_P.zero_()  # stream-ordered after the copy
        return host, ready

    def _host_buffer(self, payload: torch.Tensor) -> torch.Tensor:
        # Two buffers alternate: the semaphore guarantees the one we take is not being read.
        if not self.host_buffers or self.host_buffers[0].numel() != payload.numel():
            pin = payload.is_cuda
            self.host_buffers = [
                torch.empty(payload.numel(), dtype=torch.float64, pin_memory=pin) for _ in range(2)
            ]
            self._next = 0
        buf = self.host_buffers[self._next]
        self._next ^= 1
        return buf
