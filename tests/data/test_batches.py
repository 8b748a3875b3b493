"""Batches from indexed datasets: split by document, Megatron blends, document numbers, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist.config import DataConfig
from moe_dist.data.batches import TokenBatches
from moe_dist.data.corpus import load_corpus, parse_blend
from moe_dist.data.errors import DataError
from moe_dist.data.indexed_dataset import IndexedDatasetWriter


def write_docs(prefix: Path, docs: list[np.ndarray]) -> None:
    with IndexedDatasetWriter(prefix, np.dtype(np.uint16)) as w:
        for d in docs:
            w.add_document(d)


def numbered_docs(count: int, length: int, base: int = 0) -> list[np.ndarray]:
    """Document i holds the token ``base + i`` repeated, ending with EOS 0: its tokens name it."""
    return [np.r_[np.full(length - 1, base + i + 1), 0] for i in range(count)]


def test_split_by_document_and_document_numbers(tmp_path: Path) -> None:
    write_docs(tmp_path / "d", numbered_docs(20, 10))
    cfg = DataConfig(
        paths=[str(tmp_path / "d")], seq_len=16, micro_batch_size=6, val_fraction=0.1, document_mask=True
    )
    b = TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=64)
    # the last 2 of 20 documents are validation, whole
    assert len(b.train[0].tokens) == 180 and b.val[0].tokens.tolist() == [19] * 9 + [0] + [20] * 9 + [0]
    for batch in (b.train_batch(3, 0, 1), b.val_batch(0)):
        # a token's document is its value (EOS closes its document): doc_BS steps after each EOS
        for row, docs in zip(batch.x_BS, batch.doc_BS, strict=True):
            ends = torch.cumsum((row == 0).long(), 0)
            expected = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
            assert torch.equal(docs, expected), (row, docs)
    assert int(b.val_batch(0).x_BS.min()) == 0 and int(b.val_batch(1).x_BS.max()) <= 20
    assert int(b.train_batch(0, 0, 0).x_BS.max()) <= 18  # validation documents never in training


def test_batches_are_a_pure_function_of_seed_step_micro_rank(tmp_path: Path) -> None:
    write_docs(tmp_path / "d", numbered_docs(30, 40))
    cfg = DataConfig(paths=[str(tmp_path / "d")], seq_len=16, micro_batch_size=4)
    one = TokenBatches(load_corpus(cfg), cfg, seed=3, vocab_size=64)
    two = TokenBatches(load_corpus(cfg), cfg, seed=3, vocab_size=64)
    for key in [(0, 0, 0), (5, 1, 0), (5, 0, 1)]:
        assert torch.equal(one.train_batch(*key).x_BS, two.train_batch(*key).x_BS)
    assert not torch.equal(one.train_batch(5, 0, 0).x_BS, one.train_batch(5, 0, 1).x_BS)
    assert not torch.equal(one.train_batch(5, 0, 0).x_BS, one.train_batch(5, 1, 0).x_BS)
    assert torch.equal(one.val_batch(1).y_BS, two.val_batch(1).y_BS)


def test_megatron_blend_weights(tmp_path: Path) -> None:
    write_docs(tmp_path / "a", numbered_docs(20, 50, base=0))  # tokens 1..20
    write_docs(tmp_path / "b", numbered_docs(20, 50, base=30))  # tokens 31..50
    assert parse_blend(["0.2", "A", "0.8 B"]) == [(0.2, "A"), (0.8, "B")]
    cfg = DataConfig(
        paths=["0.2", str(tmp_path / "a"), "0.8", str(tmp_path / "b")], seq_len=8, micro_batch_size=64
    )
    b = TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=64)
    assert b.weights.tolist() == pytest.approx([0.2, 0.8]) and "0.2 x" in b.source
    rows = torch.cat([b.train_batch(s, 0, 0).x_BS for s in range(20)])
    from_b = (rows.max(dim=1).values > 25).float().mean()
    assert 0.75 < float(from_b) < 0.85
    # unweighted: by token count, as if concatenated
    cfg = DataConfig(paths=[str(tmp_path / "a"), str(tmp_path / "b")], seq_len=8)
    assert TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=64).weights.tolist() == [0.5, 0.5]
    for bad, message in [(["0.5", "A", "B"], "every entry a weight or none"), (["A", "0.5"], "not followed")]:
        with pytest.raises(DataError, match=message):
            parse_blend(bad)
    # YAML numbers are taken as weights too
    assert DataConfig(paths=[0.2, "a", 0.8, "b"]).paths == ["0.2", "a", "0.8", "b"]
