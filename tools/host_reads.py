"""Count tensor-to-host reads made by moe_dist code: the CPU stand-in for a GPU sync check.

On CUDA each ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float(t)``, ``int(t)``,
``bool(t)`` or ``t.__index__()`` of a device tensor stalls the host until the device has caught
up. CPU tests cannot see a stall, but they can see the call: ``HostReads`` wraps those methods
of ``torch.Tensor`` and records every call whose nearest caller outside torch is a file of the
``moe_dist`` package (``file:line function``). Calls from torch itself, the test or other
libraries are not counted.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import torch

import moe_dist

PACKAGE = str(Path(moe_dist.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _moe_dist_caller(frame: FrameType | None) -> str | None:
    """``path:line function`` of the nearest caller outside torch, if it is moe_dist code."""
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return None
    path = str(Path(frame.f_code.co_filename).resolve())
    if not path.startswith(PACKAGE):
        return None
    return f"{Path(path).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno} {frame.f_code.co_name}"


class HostReads:
    """``with HostReads() as reads: ...`` then ``reads.calls`` (a Counter of call sites);
    ``reads.pause()`` / ``reads.resume()`` bracket what is not to be counted."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.counting = True
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> HostReads:
        for name in METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, original: Any) -> Any:
        reads = self

        def counted(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if reads.counting:
                site = _moe_dist_caller(sys._getframe(1))
                if site is not None:
                    reads.calls[site] += 1
            return original(t, *args, **kwargs)

        return counted

    def pause(self) -> None:
        self.counting = False

    def resume(self) -> None:
        self.counting = True

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def per_step_reads(config: str, overrides: list[str], steps: int = 6) -> tuple[float, Counter[str]]:
    """Tensor-to-host reads per steady training step of ``config`` in this process (one rank):
    reads of a run of ``2 * steps`` steps minus those of a run of ``steps`` steps (same start,
    same end), divided by ``steps``. No logging, evaluation or checkpoint inside the window."""
    import tempfile  # noqa: PLC0415

    from moe_dist.config import load_config  # noqa: PLC0415
    from moe_dist.training.engines import engine_for  # noqa: PLC0415
    from moe_dist.training.run import train  # noqa: PLC0415

    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (steps, steps, 2 * steps):  # the first run pays the once-per-process probes
            sets = [
                *overrides,
                f"schedule.steps={n}",
                "schedule.warmup_steps=1",
                f"run.log_every={10 * n}",
                "eval.every=0",
                "eval.batches=1",
                "checkpoint.every=0",
                f"run.out_dir={tmp}",
                f"run.name=reads{len(counts)}",
            ]
            cfg = load_config(config, sets)
            with HostReads() as reads:
                train(cfg, engine_for(cfg), stream=open("/dev/null", "w"))  # noqa: SIM115
            counts.append(reads.calls)
    diff = counts[2].copy()
    diff.subtract(counts[1])
    return sum(diff.values()) / steps, Counter({k: v for k, v in diff.items() if v})


def main() -> None:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="tensor-to-host reads per steady training step (one process)")
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    per_step, sites = per_step_reads(args.config, args.overrides, args.steps)
    print(f"{per_step:.1f} tensor-to-host reads per steady step from moe_dist code")
    for site, n in sites.most_common():
        print(f"  {n / args.steps:6.1f}  {site}")


if __name__ == "__main__":
    main()
