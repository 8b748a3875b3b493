"""``train-tokenizer --vocab-size 8192`` on little text reaches a smaller vocabulary (issue 28): it
prints the real size and the ``--set`` lines to use, model.vocab_size included, and following
them validates (before, the hint left model.vocab_size at its default of 256: refused)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from moe_dist.cli import main
from moe_dist.data.tokenizer import HFTokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_smaller_vocabulary_is_said_and_the_hint_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "small.txt"
    text.write_text(
        "the quick brown fox jumps over the lazy dog\n" * 50 + "pack my box with five dozen jugs\n" * 50
    )
    tok = tmp_path / "tok.json"
    assert main(["train-tokenizer", str(text), "-o", str(tok), "--vocab-size", "8192"]) == 0
    out = capsys.readouterr().out
    size = HFTokenizer(tok).vocab_size
    assert size < 8192
    assert f"vocabulary {size:,} (asked for 8,192;" in out
    hint = re.search(r"use it with: (.*)", out).group(1)
    assert f"--set model.vocab_size={size}" in hint
    checked = [
        "check",
        str(ROOT / "configs" / "demo.yaml"),
        "--set",
        f"data.paths=[{text}]",
        *shlex.split(hint),
    ]
    assert main(checked) == 0, capsys.readouterr().err
