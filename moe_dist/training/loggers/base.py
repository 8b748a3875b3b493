"""The logger protocol, the failure guard and ``open_loggers`` (what ``training/run.py`` calls).

A logger is fed one metrics.jsonl record per step, already mapped to tags (``records.py``). Loggers
run on rank 0 only. A logger that raises (disk full, W&B service down, a bug) is reported with
one warning and dropped for the rest of the run, and the loggers run on a background thread, so a
slow or hung logger never holds up a step: research logging never stops training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import queue
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from moe_dist.config import Config, ConfigError
from moe_dist.training.loggers.records import record_histograms, record_scalars

# logging.<name> -> the package it needs and the extra that installs it
_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install 'moe_dist[tensorboard]'"),
    "wandb": ("wandb", "pip install 'moe_dist[wandb]'"),
}


class StepLogger(Protocol):
    """One experiment logger (TensorBoard, W&B)."""

    name: str

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        """Write one step's scalars (tag -> value) and histograms (tag -> count per expert)."""
        ...

    def close(self) -> None:
        """Flush and release files or services."""
        ...


class GuardedLoggers:
    """The run's loggers behind one guard, fed from a background thread.

    ``write`` only queues the record (microseconds on the training thread); a daemon thread maps
    it to tags and calls each logger, so a slow or hung logger (a W&B service that does not
    answer) never blocks a step. A logger that raises warns once and is dropped. When
    ``max_pending`` records wait (the loggers fall behind), later records are skipped with one
    warning until there is room. ``close`` waits up to ``close_timeout_s`` for the queue to drain.
    ``background=False`` logs on the caller's thread (export-tb, tests).
    """

    def __init__(
        self,
        loggers: list[StepLogger],
        background: bool = True,
        max_pending: int = 1000,
        close_timeout_s: float = 120.0,
    ) -> None:
        self.loggers = list(loggers)
        self.failed: list[str] = []
        self.skipped_records = 0
        self.close_timeout_s = close_timeout_s
        self._queue: queue.Queue[dict[str, Any] | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._drain, name="moe-dist-loggers", daemon=True)
            self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Send one metrics.jsonl record to every live logger (queued; the record must not change)."""
        if not self.loggers:
            return
        if self._queue is None:
            self._log(record)
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.skipped_records += 1
            if self.skipped_records == 1:
                warnings.warn(
                    f"logging: the loggers are {self._queue.maxsize} records behind; records are skipped"
                    " until they catch up (training goes on)",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def close(self) -> None:
        """Drain the queue (up to ``close_timeout_s``), then flush and close every logger."""
        if self._thread is not None and self._queue is not None:
            try:
                self._queue.put(None, timeout=self.close_timeout_s)
                self._thread.join(self.close_timeout_s)
            except queue.Full:
                pass
            if self._thread.is_alive():
                warnings.warn(
                    f"logging: the loggers did not finish within {self.close_timeout_s:.0f} s; left behind",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            self._thread = None
        for logger in list(self.loggers):
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001
                self._drop(logger, exc, "close")
        self.loggers = []

    def _drain(self) -> None:
        assert self._queue is not None
        while (record := self._queue.get()) is not None:
            self._log(record)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.loggers:
            return
        scalars, histograms = record_scalars(record), record_histograms(record)
        for logger in list(self.loggers):
            try:
                logger.log(int(record["step"]), scalars, histograms)
            except Exception as exc:  # noqa: BLE001 - any logger failure: warn once, train on
                self._drop(logger, exc, f"step {record.get('step')}")

    def _drop(self, logger: StepLogger, exc: Exception, when: str) -> None:
        self.loggers.remove(logger)
        self.failed.append(logger.name)
        warnings.warn(
            f"logging.{logger.name}: failed at {when} ({type(exc).__name__}: {exc}); "
            "this logger is off for the rest of the run, training goes on",
            RuntimeWarning,
            stacklevel=3,
        )
        with contextlib.suppress(Exception):
            logger.close()


def check_available(cfg: Config) -> None:
    """Every enabled logger's package is importable (checked on every rank, without importing it)."""
    errors = [
        f"logging.{name}.enabled: needs the {package} package ({hint})"
        for name, (package, hint) in _PACKAGES.items()
        if getattr(cfg.logging, name).enabled and importlib.util.find_spec(package) is None
    ]
    if errors:
        raise ConfigError(errors)


def open_loggers(cfg: Config, is_main: bool, resume_step: int | None) -> GuardedLoggers | None:
    """The enabled loggers on rank 0 (``None`` elsewhere or when all are off).

    ``resume_step``: the step a resumed run continues after (TensorBoard then drops the
    previous attempt's events after it). A logger that cannot start warns and is left out.
    """
    check_available(cfg)
    log_cfg = cfg.logging
    if not is_main or not (log_cfg.tensorboard.enabled or log_cfg.wandb.enabled):
        return None
    run_dir = cfg.run_dir
    guard = GuardedLoggers([])
    if log_cfg.tensorboard.enabled:
        tb_dir = Path(log_cfg.tensorboard.dir) if log_cfg.tensorboard.dir else run_dir / "tensorboard"
        _open(guard, "tensorboard", lambda: _tensorboard(tb_dir, resume_step))
    if log_cfg.wandb.enabled:
        w = log_cfg.wandb
        wandb_dir = Path(w.dir) if w.dir else run_dir
        config = cfg.model_dump(mode="json")
        _open(guard, "wandb", lambda: _wandb(wandb_dir, w.mode, w.project, w.name or cfg.run.name, config))
    return guard


def _tensorboard(log_dir: Path, resume_step: int | None) -> StepLogger:
    from moe_dist.training.loggers.tensorboard import TensorBoardLogger  # noqa: PLC0415 - lazy import

    return TensorBoardLogger(log_dir, resume_step)


def _wandb(directory: Path, mode: str, project: str, name: str, config: dict[str, Any]) -> StepLogger:
    from moe_dist.training.loggers.wandb import WandbLogger  # noqa: PLC0415 - lazy import

    return WandbLogger(directory, mode, project, name, config)


def _open(guard: GuardedLoggers, name: str, make: Callable[[], StepLogger]) -> None:
    try:
        guard.loggers.append(make())
    except Exception as exc:  # noqa: BLE001 - a logger that cannot start must not stop training
        guard.failed.append(name)
        warnings.warn(
            f"logging.{name}: could not start ({type(exc).__name__}: {exc}); training goes on without it",
            RuntimeWarning,
            stacklevel=3,
        )
