"""Tokenizers: a BPE trained here (EOS, round trip), bad tokenizer files, vocabulary vs the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_cli
from data_helpers import small_tokenizer, stdlib_texts

from moe_dist.config import DataConfig
from moe_dist.data.batches import TokenBatches
from moe_dist.data.corpus import load_corpus
from moe_dist.data.errors import DataError
from moe_dist.data.tokenizer import EOS_TOKEN, ByteTokenizer, HFTokenizer, load_tokenizer


def test_trained_bpe_has_eos_round_trips_and_compresses(tmp_path: Path) -> None:
    tok = small_tokenizer(tmp_path)
    assert tok.vocab_size == 600 and tok.eos_id == HFTokenizer(tmp_path / "tok.json").eos_id
    text = stdlib_texts()[0].read_text()
    [ids] = tok.encode_batch([text])
    assert tok.decode(ids) == text  # byte-level: lossless
    assert len(ids) < len(text.encode()) / 2  # merges learnt: fewer tokens than bytes
    assert tok.eos_id not in ids and tok.decode([tok.eos_id]) == EOS_TOKEN
    # bytes and non-ASCII text survive (every byte is in the alphabet)
    assert tok.decode(tok.encode_batch(["héllo \x00 ✓"])[0]) == "héllo \x00 ✓"
    assert ByteTokenizer().encode_batch(["hé"]) == [[104, 195, 169]]


def test_train_tokenizer_cli(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    proc = run_cli("train-tokenizer", *map(str, stdlib_texts(4)), "-o", str(out), "--vocab-size", "400")
    assert proc.returncode == 0, proc.stderr
    assert "vocabulary 400" in proc.stdout and HFTokenizer(out).vocab_size == 400


@pytest.mark.parametrize("case", ["missing", "not_a_tokenizer", "no_eos"])
def test_bad_tokenizer_file_is_one_clear_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "tok.json"
    if case == "not_a_tokenizer":
        path.write_text('{"hello": 1}')
    elif case == "no_eos":
        from tokenizers import Tokenizer, models

        Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    message = {"missing": "does not exist", "not_a_tokenizer": "is not a tokenizers file", "no_eos": "no EOS"}
    with pytest.raises(DataError, match=message[case]) as info:
        load_tokenizer("hf", str(path))
    assert str(path) in str(info.value)
    # through the CLI: exit 2, the same message, no traceback
    proc = run_cli(
        "check",
        "configs/demo.yaml",
        "--set",
        "data.tokenizer.kind=hf",
        "--set",
        f"data.tokenizer.path={path}",
    )
    assert proc.returncode == 2 and message[case] in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_vocab_smaller_is_an_error_larger_is_said_once(tmp_path: Path) -> None:
    small_tokenizer(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("".join(p.read_text() for p in stdlib_texts(3)))
    cfg = DataConfig(
        paths=[str(text)], seq_len=32, tokenizer={"kind": "hf", "path": str(tmp_path / "tok.json")}
    )
    corpora = load_corpus(cfg)
    with pytest.raises(DataError, match=r"model.vocab_size \(512\) is smaller than .* \(600\)"):
        TokenBatches(corpora, cfg, seed=0, vocab_size=512)
    batches = TokenBatches(corpora, cfg, seed=0, vocab_size=640)
    assert batches.source.count("padded to model.vocab_size 640") == 1
    assert int(batches.train_batch(0, 0, 0).x_BS.max()) < 600
    # moe-dist check finds it before any data is read
    sets = ["data.tokenizer.kind=hf", f"data.tokenizer.path={tmp_path / 'tok.json'}", "model.vocab_size=512"]
    proc = run_cli("check", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 2 and "model.vocab_size (512) is smaller than" in proc.stderr, proc.stderr
    assert "(600)" in proc.stderr and "Traceback" not in proc.stderr
