"""What a run writes for people and programs: the per-step JSONL log and rank 0's console.

``metrics.jsonl`` (schema in docs/metrics_log.md) gets one JSON object per optimizer step, and
one more per evaluation. The console gets a progress bar when stderr is a terminal (redrawn in
place) and a plain log line every ``run.log_every`` steps; no dependencies beyond the stdlib.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any


class MetricsLog:
    """Appends JSON lines; on resume, drops lines of steps after the checkpoint (they are redone)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self.path = path
        self._fh: IO[str] = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # unreadable (half-written) lines go


class Console:
    """Rank 0's log lines and progress bar on stderr (silent on other ranks).

    One line per flushed log step, Megatron / torchtitan style: the task loss, each aux term,
    the gradient norm, the learning rate, the load balance of the MoE layers (mean Gini and the
    worst MaxVio over layers, this step's counts), peak memory (the largest rank's), tokens/s
    averaged over the log interval, the skipped-step count when there are any, and the
    validation loss on evaluation steps::

        step    100/600  loss 3.7863  switch 0.0101  grad 0.53  lr 6.95e-04  gini 0.120  maxvio 0.45
        mem 1.20GiB  1,153 tok/s  val 3.8803                                  (one line on the console)
    """

    def __init__(self, total_steps: int, enabled: bool, stream: IO[str] | None = None) -> None:
        self.total, self.enabled = total_steps, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._bar_shown = False

    def say(self, text: str) -> None:
        if self.enabled:
            self._clear_bar()
            print(text, file=self.stream, flush=True)

    def log(self, record: dict[str, Any], interval_tokens_per_s: float, skipped: int = 0) -> None:
        """The log line of ``record`` (a metrics.jsonl record, ``step_record``)."""
        if self.enabled:
            self.say(log_line(record, interval_tokens_per_s, skipped, self.total))

    def progress(self, step: int, losses: dict[int, float]) -> None:
        """Redraw the progress bar (a terminal only) with the newest loss read back."""
        if not self.tty:
            return
        width = 30
        done = int(width * step / max(1, self.total))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, step) * (self.total - step)
        bar = "#" * done + "." * (width - done)
        loss = f"  loss {losses[max(losses)]:.3f}" if losses else ""
        self.stream.write(f"\r[{bar}] {step}/{self.total}{loss}  eta {eta:,.0f}s ")
        self.stream.flush()
        self._bar_shown = True

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False


def log_line(record: dict[str, Any], tokens_per_s: float, skipped: int, total: int) -> str:
    """The console's one line for a log step (``Console`` docstring)."""
    parts = [f"step {record['step']:>6}/{total}", f"loss {record['loss']:.4f}"]
    parts += [f"{name} {value:.4g}" for name, value in record.get("aux", {}).items()]
    parts += [f"grad {record['grad_norm']:.3g}", f"lr {record['lr']:.2e}"]
    layers = record.get("layers") or []
    if layers:
        gini = sum(layer["gini"] for layer in layers) / len(layers)
        maxvio = max(layer["max_violation"] for layer in layers)
        parts += [f"gini {gini:.3f}", f"maxvio {maxvio:.2f}"]
    memory = record.get("peak_memory_bytes") or []
    if memory:
        parts.append(f"mem {max(memory) / 2**30:.2f}GiB")
    parts.append(f"{tokens_per_s:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if skipped:
        parts.append(f"skipped {skipped}")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    return "  ".join(parts)
