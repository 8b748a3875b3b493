"""Tiny runs trained through the real CLI (``moe-dist train``, one process), once per session.

``trained_run(name, *overrides)`` trains tests/assets/tiny.yaml at EP=1 for a few steps with the
``--set`` overrides and returns the run directory; the same name returns the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import run_cli
from train_helpers import TINY_YAML, write_corpus

# Mixtral-like: grouped-query attention (2 query heads per key/value head), untied output, RoPE 1e6.
MIXTRAL_RUN = (
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.tie_embeddings=false",
    "model.rope_theta=1000000",
)
# Qwen3-MoE-like: QK-norm, 4 query heads per key/value head, one dense layer first, top-k weights
# not renormalised (norm_topk_prob false), tied embeddings, RMSNorm eps 1e-6.
QWEN3_RUN = (
    "model.n_layers=3",
    "model.n_heads=4",
    "model.n_kv_heads=1",
    "model.qk_norm=true",
    "model.dense_layers=1",
    "model.dense_ffn_hidden_size=48",
    "model.norm_eps=1e-6",
    "model.moe.router.renormalize=false",
)


@pytest.fixture(scope="session")
def export_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    write_corpus(tmp)
    return tmp


@pytest.fixture(scope="session")
def trained_run(export_tmp: Path) -> Callable[..., Path]:
    runs: dict[str, Path] = {}

    def train(name: str, *overrides: str, steps: int = 4) -> Path:
        if name not in runs:
            sets = [
                "parallel.ep_size=1",
                f"run.out_dir={export_tmp / 'runs'}",
                f"run.name={name}",
                f"data.paths=[{export_tmp / 'corpus.txt'}]",
                f"schedule.steps={steps}",
                "schedule.warmup_steps=1",
                *overrides,
            ]
            proc = run_cli("train", str(TINY_YAML), *[a for s in sets for a in ("--set", s)])
            assert proc.returncode == 0, proc.stderr[-2000:]
            runs[name] = export_tmp / "runs" / name
        return runs[name]

    return train


@pytest.fixture(scope="session")
def hf_tokenizer_file(export_tmp: Path) -> Path:
    """A byte-level BPE (vocabulary 300, EOS) trained on the tiny corpus through the CLI."""
    out = export_tmp / "tok.json"
    proc = run_cli("train-tokenizer", str(export_tmp / "corpus.txt"), "-o", str(out), "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def mixtral_run(trained_run: Callable[..., Path]) -> Path:
    return trained_run("mixtral", *MIXTRAL_RUN)


@pytest.fixture(scope="session")
def qwen3_run(trained_run: Callable[..., Path], hf_tokenizer_file: Path) -> Path:
    """The Qwen3-like run, on a ``tokenizers`` BPE (so its files and EOS are exported too)."""
    tok = ("data.tokenizer.kind=hf", f"data.tokenizer.path={hf_tokenizer_file}", "model.vocab_size=300")
    return trained_run("qwen3", *QWEN3_RUN, *tok)
