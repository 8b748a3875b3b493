"""``moe-dist export-tb RUN_DIR|COMPARE_DIR -o TB_DIR``: finished runs' metrics.jsonl -> TensorBoard.

Every directory under the given one (itself included) that holds a ``metrics.jsonl`` becomes one
TensorBoard run, named by its path relative to the given directory (the given directory itself:
by its own name), so the arms of a comparison (``runs/<arm>/`` or ``runs/<arm>/seed<N>/``)
overlay in one TensorBoard::

    moe-dist export-tb runs/compare -o tb && tensorboard --logdir tb

Tags and histograms are those of the live logger (``training/loggers/records.py``). Wall times
are rebuilt from each record's ``elapsed_s`` and the log's modification time. All logs are read
before anything is written; no metrics.jsonl, an unreadable line or a target run that already
holds event files: one message, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


class ExportError(Exception):
    """Bad input for export-tb (reported as one line, exit 2)."""


def add_export_tb_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-tb", help="convert finished runs' metrics.jsonl to TensorBoard event files (one run per arm)"
    )
    p.add_argument("source", help="a run directory, or a compare directory holding several runs")
    p.add_argument("-o", "--out", required=True, help="TensorBoard log directory to write")
    p.set_defaults(func=export_tb_main)


def export_tb_main(args: argparse.Namespace) -> int:
    try:
        runs = export_tb(Path(args.source), Path(args.out))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for name, n in runs.items():
        print(f"{name}: {n} records -> {Path(args.out) / name}")
    print(f"tensorboard --logdir {args.out}")
    return 0


def find_logs(source: Path) -> dict[str, Path]:
    """TensorBoard run name -> metrics.jsonl, for every metrics.jsonl under ``source``."""
    if not source.is_dir():
        raise ExportError(f"{source}: not a directory (give a run directory or a compare directory)")
    logs = {}
    for path in sorted(source.rglob("metrics.jsonl")):
        rel = path.parent.relative_to(source)
        logs[source.resolve().name if rel == Path(".") else rel.as_posix()] = path
    if not logs:
        raise ExportError(
            f"{source}: no metrics.jsonl found under it (is it a moe-dist run or compare directory?)"
        )
    return logs


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one metrics.jsonl; a line that is not a JSON object with a step is an error."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: cannot be read ({exc})") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ExportError(f"{path}:{i}: not a JSON line ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ExportError(f"{path}:{i}: not a metrics record (no integer 'step')")
        records.append(record)
    if not records:
        raise ExportError(f"{path}: holds no records")
    return records


def export_tb(source: Path, out: Path) -> dict[str, int]:
    """Write one TensorBoard run per metrics.jsonl under ``source`` into ``out``; records per run."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ExportError("export-tb needs the tensorboard package (pip install 'moe_dist[tensorboard]')")
    logs = find_logs(source)
    loaded = {name: (path, read_records(path)) for name, path in logs.items()}
    for name in loaded:
        target = out / name
        if target.is_dir() and any(target.glob("events.out.tfevents.*")):
            raise ExportError(f"{target}: already holds TensorBoard events (remove it or pick another -o)")
    from moe_dist.training.loggers.records import record_histograms, record_scalars  # noqa: PLC0415
    from moe_dist.training.loggers.tensorboard import TensorBoardLogger  # noqa: PLC0415 - lazy import

    counts = {}
    for name, (path, records) in loaded.items():
        end = path.stat().st_mtime - float(records[-1].get("elapsed_s", 0.0))
        logger = TensorBoardLogger(out / name, flush_secs=120)
        try:
            for r in records:
                wall = end + float(r["elapsed_s"]) if "elapsed_s" in r else None
                logger.log(r["step"], record_scalars(r), record_histograms(r), walltime=wall)
        finally:
            logger.close()
        counts[name] = len(records)
    return counts
