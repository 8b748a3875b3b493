"""Per-step values kept on the device between the steps that log: one host transfer per interval.

Shape legend: N steps in the interval, L MoE layers, E experts, A loss terms (task + aux).

A training step must not wait for the device (``docs/performance.md``): every ``.item()`` or
``.tolist()`` of a device tensor stalls the launch queue. So the loop hands each step's values
to `StepBuffer.add` as device tensors (loss terms reduced over the ranks, the gradient norm, the
non-finite flag, every layer's global expert counts and dropped slots) and reads them back only
in `flush`, on the steps that log, evaluate, checkpoint or end the run:

1. Stack the interval's tensors and compute every layer's load metrics of every step on the
   device (``metrics.load_stats_L`` on ``[N * L, E]``).
2. ONE transfer of everything to the host (``tolist``).
3. One `StepRecord` per step, in order: the same values a per-step read would have given. Wall
   time is known per interval only (the host runs ahead of the device between flushes), so each
   step of an interval gets the interval's mean step time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_dist.metrics import load_stats_L


@dataclass
class StepRecord:
    """One optimizer step as read back at a flush (host values)."""

    step: int
    lr: float
    loss: float
    aux: dict[str, float]
    grad_norm: float
    skipped: bool
    step_seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)  # per MoE layer: counts and load metrics


@dataclass
class _Pending:
    step: int
    lr: float
    values_A2: torch.Tensor  # noqa: N815 - loss terms, then grad norm, then the skip flag (float64)
    counts_LE: torch.Tensor  # noqa: N815
    dropped_L: torch.Tensor  # noqa: N815


class StepBuffer:
    """Device-side values of the steps since the last flush (module docstring)."""

    def __init__(self, moe_blocks: list[int]) -> None:
        self.moe_blocks = moe_blocks
        self.aux_names: list[str] = []
        self.pending: list[_Pending] = []
        self.t_last = time.perf_counter()

    def add(
        self,
        step: int,
        lr: float,
        aux_names: list[str],
        losses_A: torch.Tensor,
        grad_norm: torch.Tensor,
        skipped: torch.Tensor,
        counts_E: list[torch.Tensor],
        dropped: list[torch.Tensor],
    ) -> None:
        """``losses_A``: task loss, then the aux terms named ``aux_names`` (reduced over ranks);
        ``counts_E`` and ``dropped``: each MoE layer's global counts and dropped slots."""
        if self.pending and aux_names != self.aux_names:
            raise ValueError(
                f"StepBuffer: aux terms changed within an interval: {self.aux_names} -> {aux_names}"
            )
        self.aux_names = list(aux_names)
        dev = losses_A.device
        values = torch.cat(
            [losses_A.double(), grad_norm.reshape(1).double().to(dev), skipped.reshape(1).double()]
        )
        counts_LE = (
            torch.stack(counts_E).double() if counts_E else torch.zeros(0, 0, dtype=torch.float64, device=dev)
        )
        dropped_L = (
            torch.stack([d.reshape(()) for d in dropped]).double()
            if dropped
            else torch.zeros(0, dtype=torch.float64, device=dev)
        )
        self.pending.append(_Pending(step, lr, values, counts_LE, dropped_L))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """What runs inside (evaluation, a checkpoint) does not count as step time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t_last += time.perf_counter() - t0

    def flush(self) -> list[StepRecord]:
        """Read the interval back (module docstring); empty when nothing is pending."""
        if not self.pending:
            return []
        N, A = len(self.pending), len(self.aux_names) + 1
        values_NX = torch.stack([p.values_A2 for p in self.pending])
        parts = [values_NX.reshape(-1)]
        L = self.pending[0].counts_LE.shape[0]
        stats_names: list[str] = []
        if L:
            counts_NLE = torch.stack([p.counts_LE for p in self.pending])
            dropped_NL = torch.stack([p.dropped_L.to(counts_NLE.device) for p in self.pending])
            stats = load_stats_L(counts_NLE.reshape(N * L, -1))
            stats_names = list(stats)
            routed_NL = counts_NLE.sum(-1)
            dropped_frac_NL = torch.where(routed_NL > 0, dropped_NL / routed_NL, 0.0)
            parts += [counts_NLE.reshape(-1), *(v.to(counts_NLE.device) for v in stats.values())]
            parts.append(dropped_frac_NL.reshape(-1))
        device = values_NX.device
        host = torch.cat([p.to(device) for p in parts]).tolist()  # the one transfer
        seconds = (time.perf_counter() - self.t_last) / N
        self.t_last = time.perf_counter()
        out = []
        vals, at = host[: N * (A + 2)], N * (A + 2)
        if L:
            E = self.pending[0].counts_LE.shape[1]
            counts, at = host[at : at + N * L * E], at + N * L * E
            metric_rows = {}
            for name in stats_names:
                metric_rows[name], at = host[at : at + N * L], at + N * L
            dropped_frac = host[at : at + N * L]
        for n, p in enumerate(self.pending):
            row = vals[n * (A + 2) : (n + 1) * (A + 2)]
            layers = []
            for i in range(L):
                j = n * L + i
                layers.append(
                    {
                        "layer": self.moe_blocks[i],
                        "counts": counts[j * E : (j + 1) * E],
                        **{name: metric_rows[name][j] for name in stats_names},
                        "dropped_fraction": dropped_frac[j],
                    }
                )
            out.append(
                StepRecord(
                    step=p.step,
                    lr=p.lr,
                    loss=row[0],
                    aux=dict(zip(self.aux_names, row[1:A])),
                    grad_norm=row[A],
                    skipped=bool(row[A + 1]),
                    step_seconds=seconds,
                    layers=layers,
                )
            )
        self.pending.clear()
        return out
