"""Local text and a small BPE tokenizer trained on it, for the data tests (nothing downloads)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from moe_dist.data.tokenizer import HFTokenizer, train_bpe

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(count: int = 12) -> list[Path]:
    """A few of the standard library's own modules: real text, a few hundred kB."""
    return sorted((STDLIB / "json").glob("*.py"))[:count] + sorted((STDLIB / "email").glob("*.py"))[:count]


def small_tokenizer(tmp: Path, vocab_size: int = 600) -> HFTokenizer:
    """A byte-level BPE trained on ``stdlib_texts`` (a second or two), written to ``tmp/tok.json``."""
    return train_bpe((p.read_text() for p in stdlib_texts()), vocab_size, tmp / "tok.json")
