"""One training run's ``metrics.jsonl`` (docs/metrics_log.md) as arrays the report and plots use.

Shape legend: L MoE layers, N logged steps, E experts, M evaluations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RunLogError(ValueError):
    """A metrics log that cannot be read; the message names the file and line."""


@dataclass
class RunLog:
    name: str
    path: Path
    steps_N: np.ndarray  # int64 optimizer steps
    loss_N: np.ndarray  # training task loss
    tokens_N: np.ndarray  # tokens seen after the step (whole group)
    tokens_per_s_N: np.ndarray  # per-step throughput (evaluation time excluded)
    layer_ids: list[int]  # block index of each MoE layer
    counts_LNE: np.ndarray  # global token-slot counts per layer, step, expert
    eval_steps_M: np.ndarray
    eval_tokens_M: np.ndarray
    val_loss_M: np.ndarray

    @property
    def final_val_loss(self) -> float | None:
        return float(self.val_loss_M[-1]) if len(self.val_loss_M) else None


def read_run_log(path: str | Path, name: str | None = None) -> RunLog:
    """Parse a metrics.jsonl; every step line must carry the same MoE layers."""
    path = Path(path)
    if not path.is_file():
        raise RunLogError(f"metrics log {path} does not exist")
    steps, losses, tokens, tps, counts = [], [], [], [], []
    ev_steps, ev_tokens, ev_loss = [], [], []
    layer_ids: list[int] | None = None
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RunLogError(f"{path}:{lineno}: not a metrics record ({exc})") from None
        layers = rec.get("layers")
        if layers is not None:
            ids = [int(x["layer"]) for x in layers]
            if layer_ids is None:
                layer_ids = ids
            elif ids != layer_ids:
                raise RunLogError(f"{path}:{lineno}: MoE layers {ids} differ from earlier lines' {layer_ids}")
            steps.append(step)
            losses.append(float(rec["loss"]))
            tokens.append(float(rec["tokens"]))
            tps.append(float(rec.get("tokens_per_s", float("nan"))))
            counts.append([x["counts"] for x in layers])
        if rec.get("val_loss") is not None:
            ev_steps.append(step)
            ev_tokens.append(float(rec["tokens"]))
            ev_loss.append(float(rec["val_loss"]))
    if not steps:
        raise RunLogError(f"{path}: no step records")
    counts_NLE = np.asarray(counts, dtype=np.float64)
    return RunLog(
        name=name or path.parent.name,
        path=path,
        steps_N=np.asarray(steps, dtype=np.int64),
        loss_N=np.asarray(losses),
        tokens_N=np.asarray(tokens),
        tokens_per_s_N=np.asarray(tps),
        layer_ids=layer_ids or [],
        counts_LNE=counts_NLE.transpose(1, 0, 2),
        eval_steps_M=np.asarray(ev_steps, dtype=np.int64),
        eval_tokens_M=np.asarray(ev_tokens),
        val_loss_M=np.asarray(ev_loss),
    )
