"""Experiment loggers: TensorBoard and W&B on rank 0, fed the records of metrics.jsonl.

``records.py`` maps one metrics.jsonl record to scalar tags and per-expert histograms (one
place, used by both loggers and by ``moe-dist export-tb``); ``base.py`` holds the logger
protocol, the failure guard (a logger that raises warns once and is dropped, training goes on)
and ``open_loggers``; ``tensorboard.py`` and ``wandb.py`` import their packages only when a
run enables them, so an off logger costs nothing, not even its import.
"""

from moe_dist.training.loggers.base import GuardedLoggers, StepLogger, open_loggers
from moe_dist.training.loggers.records import record_histograms, record_scalars

__all__ = ["GuardedLoggers", "StepLogger", "open_loggers", "record_histograms", "record_scalars"]
