"""Stopping cleanly: on SIGTERM / SIGUSR1 (preemption, SLURM's ``--signal``) and before a time
limit (``run.max_minutes``), every rank stops after the SAME step, so that the loop can save one
checkpoint and exit with ``EXIT_RESUMABLE``.

The loop's whole contract::

    stop = StopDecision.start(cfg.run.max_minutes)      # every rank, after the process group exists
    for step in ...:
        ... one optimizer step ...
        reason = stop.stop_reason(step)                   # every rank, once per step
        if reason is not None:
            save a checkpoint of ``step``; say ``reason``; stop.close(); sys.exit(EXIT_RESUMABLE)
    stop.close()

1. ``StopDecision.start`` installs a handler for each signal that ONLY records it (no I/O, no
   exception inside the step: a Python handler runs between bytecodes, in the middle of whatever
   the step is doing; with SA_RESTART, so no system call of a communication thread fails),
   starts the clock of ``max_minutes``, and, with several processes, makes a small gloo process
   group for this flag alone (``dist.new_group(backend="gloo")``, a collective: every rank calls
   ``start`` at the same point).
2. ``stop_reason(step)``: this rank's code (0 = go on, 1 = time limit, 100 + the signal number:
   SIGUSR1 110, SIGTERM 115), MAX-all-reduced as an int32 CPU tensor over that gloo group, so every
   rank gets the same answer at the same step, whichever rank was signalled or whose clock ran
   out first. A CPU tensor on a gloo group: deciding never waits for the GPU stream, and the
   model's NCCL group is not touched. One process: no collective.
3. The answer is a sentence for the console, the same text on every rank (``"SIGTERM received,
   stopping after step 812"``, ``"run.max_minutes (30) reached, stopping after step 812"``), or None.

Exit code ``EXIT_RESUMABLE = 143`` (128 + SIGTERM, what a shell reports for a process ended by
SIGTERM):

- torchrun (``max_restarts > 0``) restarts the worker group after any non-zero exit; ``moe-dist
  launch`` then adds ``--resume`` (``launcher/plan.resume_on_restart``), so the group continues
  from the checkpoint. torchrun forwards SIGTERM (also SIGINT, SIGHUP, SIGQUIT) to its workers and
  waits 30 s before SIGKILL; it does NOT forward SIGUSR1 unless ``TORCHELASTIC_SIGNALS_TO_HANDLE``
  names it, so under torchrun ask SLURM for ``--signal=TERM@SECONDS``.
- SLURM (``#SBATCH --requeue``): a preempted job is requeued by the scheduler whatever the exit
  code. A job that stops itself (``max_minutes``, or ``--signal=USR1@T`` before the wall-time
  limit) is requeued when the site lists the code in slurm.conf's ``RequeueExit=143``, or by the
  batch script: ``rc=$?; [ "$rc" = 143 ] && scontrol requeue "$SLURM_JOB_ID"``. The requeued
  job runs ``train ... --resume``.

Source: Megatron-LM ``--exit-signal-handler`` and ``--exit-duration-in-mins``
(``megatron/training/dist_signal_handler.py``: ``DistributedSignalHandler``, a handler that sets
``_signal_received``, all-gathered by ``signals_received``; ``megatron/training/training.py``:
``checkpoint_and_decide_exit``, which every iteration saves and exits on a received signal, and
MAX-all-reduces ``train_time > exit_duration_in_mins``). Differences, each an option here:

- The agreement runs on its own gloo group with a CPU tensor (``backend="gloo"``); Megatron
  all-gathers a CUDA tensor on the default group and reads it with ``.item()`` every iteration,
  a host sync of the GPU stream. ``backend=None`` uses the default group as Megatron does.
- One MAX all-reduce carries both reasons; Megatron makes one all-gather (signal) and one
  all-reduce (duration).
- SIGTERM and SIGUSR1 by default (``signals=``); Megatron handles one (``--exit-signal``, default
  SIGTERM).
- Exit code 143 (``EXIT_RESUMABLE``), so restarts happen; Megatron exits 0 after both stops.
- The clock starts at ``start`` (``started_at``, a ``time.monotonic()`` value, overrides);
  Megatron's at the start of ``pretrain``. A torchrun restart starts it again, as Megatron's.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

EXIT_RESUMABLE = 128 + signal.SIGTERM  # 143
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
TIME_LIMIT = 1  # the code of "max_minutes reached"
SIGNAL_BASE = 100  # a signal's code is SIGNAL_BASE + its number: above the time limit in the MAX


class SignalFlag:
    """Records the first of ``signals`` received; the handler does nothing else. ``restore``
    puts the previous handlers back."""

    def __init__(self, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        self.received: int = 0
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
            # SA_RESTART: a system call the signal interrupts (a socket read of a gloo/NCCL thread)
            # restarts instead of failing with EINTR; Python's own handlers are installed without it
            signal.siginterrupt(sig, False)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopDecision:
    """Whether to stop after this step, the same answer on every rank (see the module docstring)."""

    def __init__(
        self,
        flag: SignalFlag,
        max_minutes: float | None,
        started_at: float,
        group: Any,
        distributed: bool,
    ) -> None:
        self.flag = flag
        self.max_minutes = max_minutes
        self.started_at = started_at
        self.group = group
        self.distributed = distributed
        self._code_1 = torch.zeros(1, dtype=torch.int32)  # CPU: gloo reduces it on the host

    @classmethod
    def start(
        cls,
        max_minutes: float | None = None,
        *,
        signals: Sequence[signal.Signals] = STOP_SIGNALS,
        backend: str | None = "gloo",
        started_at: float | None = None,
    ) -> StopDecision:
        """Install the handlers and, with several processes, make the flag's process group
        (collective: every rank calls it at the same point). ``backend=None``: the default group."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        group = dist.new_group(backend=backend) if distributed and backend is not None else None
        started = time.monotonic() if started_at is None else started_at
        return cls(SignalFlag(signals), max_minutes, started, group, distributed)

    def minutes(self) -> float:
        return (time.monotonic() - self.started_at) / 60.0

    def local_code(self) -> int:
        """This rank's reason, before agreement: 100 + the signal number, 1 for the time limit, 0."""
        if self.flag.received:
            return SIGNAL_BASE + int(self.flag.received)
        if self.max_minutes is not None and self.minutes() >= self.max_minutes:
            return TIME_LIMIT
        return 0

    def stop_reason(self, step: int) -> str | None:
        """Call once per step on every rank; the same answer everywhere (None: go on)."""
        code = self.local_code()
        if self.distributed:
            self._code_1.fill_(code)
            dist.all_reduce(self._code_1, op=dist.ReduceOp.MAX, group=self.group)
            code = int(self._code_1.item())  # a CPU tensor: no device sync
        if code == 0:
            return None
        if code == TIME_LIMIT:
            return f"run.max_minutes ({self.max_minutes:g}) reached, stopping after step {step}"
        return f"{signal.Signals(code - SIGNAL_BASE).name} received, stopping after step {step}"

    def close(self) -> None:
        """Restore the previous signal handlers and free the flag's group (every rank)."""
        self.flag.restore()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
