"""Tiny configs and rank bodies shared by the training, checkpoint and model tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_dist.config import Config, config_from_dict

TINY_TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Counter:\n    def __init__(self):\n        self.n = 0\n\n"
    "    def tick(self):\n        self.n += 1\n        return self.n\n\n"
) * 200


def write_corpus(tmp: Path) -> Path:
    path = tmp / "corpus.txt"
    path.write_text(TINY_TEXT)
    return path


def tiny_config(tmp: Path, **over: Any) -> Config:
    """A 2-layer, 4-expert model on a small text file: a few dozen steps take seconds."""
    data: dict[str, Any] = {
        "run": {"name": "t", "out_dir": str(tmp / "runs"), "seed": 7, "log_every": 1000},
        "model": {
            "dim": 32,
            "n_layers": 2,
            "n_heads": 2,
            "max_seq_len": 32,
            "moe": {
                "num_experts": 4,
                "router": {"name": "topk_softmax", "top_k": 2},
                "losses": [{"name": "switch", "coef": 0.01}],
                "experts": {"ffn_hidden_size": 64},
            },
        },
        "optim": {"lr": 3e-3},
        "schedule": {"steps": 24, "warmup_steps": 4},
        "data": {"paths": [str(write_corpus(tmp))], "seq_len": 32, "micro_batch_size": 4},
        "eval": {"every": 0, "batches": 4},
        "checkpoint": {"every": 0, "keep": 3},
    }
    for key, value in over.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(data)


def train_body(
    rank: int, world_size: int, cfg: Config, resume: str | None = None, stop_after: int | None = None
) -> dict[str, Any]:
    """Train on this rank (dist is already initialised by run_on_ranks); results as plain data."""
    import io

    from moe_dist.training.run import train

    stream = io.StringIO()
    r = train(cfg, resume=resume, stop_after=stop_after, stream=stream)
    return {
        "losses": r.losses,
        "val": r.val_losses,
        "skipped": r.skipped_steps,
        "counts": r.counts_per_layer,
        "log": stream.getvalue(),
        "tokens_per_s": r.tokens_per_s,
    }
