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
    """Rank 0's progress bar and log lines on stderr (silent on other ranks)."""

    def __init__(
        self, total_steps: int, enabled: bool, log_every: int, stream: IO[str] | None = None
    ) -> None:
        self.total, self.enabled, self.log_every = total_steps, enabled, log_every
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._bar_shown = False

    def say(self, text: str) -> None:
        if self.enabled:
            self._clear_bar()
            print(text, file=self.stream, flush=True)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        if step % self.log_every == 0 or step == self.total:
            self.say(
                f"step {step:>6}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s{extra}"
            )
        if self.tty:
            width = 30
            done = int(width * step / max(1, self.total))
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(1, step) * (self.total - step)
            bar = "#" * done + "." * (width - done)
            self.stream.write(f"\r[{bar}] {step}/{self.total}  loss {loss:.3f}  eta {eta:,.0f}s ")
            self.stream.flush()
            self._bar_shown = True

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
