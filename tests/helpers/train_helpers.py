"""The tiny test config (tests/assets/tiny.yaml and dotted overrides), a tiny model of 2 MoE blocks,
and the training tests' rank body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_dist.config import Config, ModelConfig, apply_overrides, config_from_dict, read_yaml

TINY_TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Counter:\n    def __init__(self):\n        self.n = 0\n\n"
    "    def tick(self):\n        self.n += 1\n        return self.n\n\n"
) * 200


def write_corpus(tmp: Path) -> Path:
    path = tmp / "corpus.txt"
    path.write_text(TINY_TEXT)
    return path


TINY_YAML = Path(__file__).resolve().parents[1] / "assets" / "tiny.yaml"
# The training tests run longer than the launcher tests' 8 steps, so that losses visibly fall.
TRAINING_RUN = ("run.name=t", "schedule.steps=24", "schedule.warmup_steps=4", "eval.batches=4")


def tiny_data(tmp: Path, *overrides: str) -> dict[str, Any]:
    """tests/assets/tiny.yaml on a small corpus in ``tmp``, runs under ``tmp/runs``, then
    ``overrides`` (``a.b=value``, as ``--set`` takes them)."""
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        write_corpus(tmp)
    data = read_yaml(TINY_YAML)
    where = [f"run.out_dir={json.dumps(str(tmp / 'runs'))}", f"data.paths=[{json.dumps(str(corpus))}]"]
    errors = apply_overrides(data, [*where, *overrides])
    assert not errors, errors
    return data


def tiny_model_config(**model: Any) -> ModelConfig:
    """dim 32, 2 blocks of 2 heads, 4 experts top-2 of width 32, sequences of 16; ``model`` keys
    replace the top-level ones (``compile``, ``fp32_residual``...)."""
    moe = {
        "num_experts": 4,
        "router": {"name": "topk_softmax", "top_k": 2},
        "losses": [{"name": "switch", "coef": 0.01}],
        "experts": {"ffn_hidden_size": 32},
    }
    base = {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "moe": moe}
    return config_from_dict({"model": base | model, "data": {"seq_len": 16}}).model


def tiny_config(tmp: Path, *overrides: str) -> Config:
    """The 2-layer, 4-expert tiny model of the training tests: a few dozen steps take seconds."""
    return config_from_dict(tiny_data(tmp, *TRAINING_RUN, *overrides))


def train_body(
    rank: int, world_size: int, cfg: Config, resume: str | None = None, stop_after: int | None = None
) -> dict[str, Any]:
    """Train on this rank (dist is already initialised by run_on_ranks); results as plain data."""
    import io

    from moe_dist.training.engines import engine_for
    from moe_dist.training.run import train

    stream = io.StringIO()
    r = train(cfg, engine_for(cfg), resume=resume, stop_after=stop_after, stream=stream)
    return {
        "losses": r.losses,
        "val": r.val_losses,
        "skipped": r.skipped_steps,
        "counts": r.counts_per_layer,
        "log": stream.getvalue(),
        "tokens_per_s": r.tokens_per_s,
    }
