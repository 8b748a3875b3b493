"""Byte-level text corpora: sources, splits by file, deterministic per-rank batches, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data.batches import TokenBatches
from moe_dist.data.corpus import is_validation_file, load_corpus, stdlib_files
from moe_dist.data.errors import DataError


def test_stdlib_corpus_is_sorted_capped_and_split() -> None:
    files = stdlib_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    cfg = DataConfig(max_bytes=2_000_000, seq_len=64, val_fraction=0.1)
    [corpus] = load_corpus(cfg)
    assert len(corpus.tokens) == 2_000_000
    first_train = next(f for f in files if not is_validation_file(f, 0.1))
    assert bytes(corpus.tokens[:200]) == first_train.read_bytes()[:200]
    batches = TokenBatches([corpus], cfg, seed=1, vocab_size=256)
    [train], [val] = (s.tokens for s in batches.train), (s.tokens for s in batches.val)
    # split by file name hash: whole files, roughly val_fraction of the bytes, same on every load
    assert len(val) + len(train) == 2_000_000
    assert 0.03 < len(val) / 2_000_000 < 0.25
    assert corpus.val_start == len(train)
    assert load_corpus(cfg)[0].val_start == corpus.val_start


def test_one_file_falls_back_to_a_byte_split(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_bytes(b"x" * 10_000)
    cfg = DataConfig(paths=[str(path)], seq_len=16, val_fraction=0.1)
    batches = TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=256)
    assert (len(batches.train[0].tokens), len(batches.val[0].tokens)) == (9_000, 1_000)


def test_batches_are_shifted_deterministic_and_differ_by_rank(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(bytes(range(256)) * 40)
    cfg = DataConfig(paths=[str(path)], seq_len=16, micro_batch_size=3)
    b = TokenBatches(load_corpus(cfg), cfg, seed=5, vocab_size=256)
    x, y, doc = b.train_batch(step=7, micro=0, rank=1)
    assert doc is None  # data.document_mask off
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 256)  # next byte of a 0..255 ramp
    again = TokenBatches(load_corpus(cfg), cfg, seed=5, vocab_size=256).train_batch(7, 0, 1)
    assert torch.equal(x, again[0])
    assert not torch.equal(x, b.train_batch(7, 0, 0)[0])
    assert not torch.equal(x, b.train_batch(8, 0, 1)[0])
    assert torch.equal(b.val_batch(2)[0], b.val_batch(2)[0])


def test_directories_and_globs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("B" * 100)
    (tmp_path / "d" / "sub" / "a.txt").write_text("A" * 100)
    (tmp_path / "d" / ".hidden").write_text("H" * 100)
    [corpus] = load_corpus(DataConfig(paths=[str(tmp_path / "d")]))
    assert bytes(corpus.tokens) == b"B" * 100 + b"A" * 100  # sorted paths, hidden skipped
    assert corpus.doc_bounds.tolist() == [0, 100, 200]  # a document per file
    [corpus] = load_corpus(DataConfig(paths=[str(tmp_path / "d" / "**" / "*.txt")]))
    assert len(corpus.tokens) == 200


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["{tmp}/missing.txt"], "missing.txt' does not exist"),
        (["{tmp}/empty_dir"], "empty_dir' has no files"),
        (["{tmp}/*.nothing"], "no files match"),
        (["{tmp}/short.txt"], "too short: its training split has"),
        (["{tmp}/empty.txt"], "is empty"),
    ],
)
def test_bad_sources_name_the_path(tmp_path: Path, paths: list[str], message: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "short.txt").write_text("x" * 40)
    (tmp_path / "empty.txt").write_text("")
    cfg = DataConfig(paths=[p.format(tmp=tmp_path) for p in paths], seq_len=64)
    with pytest.raises(DataError, match=message) as info:
        TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=256)
    assert str(tmp_path) in str(info.value)
