"""``data.hf``: local .jsonl through ``datasets``, tokenized once into an indexed dataset cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import small_tokenizer

from moe_dist.config import DataConfig
from moe_dist.data import hf_source
from moe_dist.data.batches import TokenBatches
from moe_dist.data.corpus import load_corpus
from moe_dist.data.errors import DataError


def _config(tmp: Path, text_field: str = "text") -> DataConfig:
    return DataConfig(
        hf={"path": "json", "data_files": [str(tmp / "*.jsonl")], "text_field": text_field},
        tokenizer={"kind": "hf", "path": str(tmp / "tok.json")},
        seq_len=16,
        micro_batch_size=2,
    )


def test_jsonl_through_datasets_is_cached_and_the_second_run_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = small_tokenizer(tmp_path)
    texts = [f"record {i}: " + "words and more words " * (i % 5 + 1) for i in range(40)]
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
    )
    cache = tmp_path / "run" / "data_cache"
    [first] = load_corpus(_config(tmp_path), cache)
    assert "tokenized" in first.source and first.doc_bounds.tolist()[-1] == len(first.tokens)
    assert len(first.doc_bounds) == 41  # a document per record
    assert tok.decode(first.tokens[first.doc_bounds[0] : first.doc_bounds[1] - 1].tolist()) == texts[0]
    assert int(first.tokens[first.doc_bounds[1] - 1]) == tok.eos_id
    assert sorted(p.suffix for p in cache.glob("hf-*")) == [".bin", ".idx"]

    def no_datasets(*args: object) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(hf_source, "_records", no_datasets)
    [second] = load_corpus(_config(tmp_path), cache)
    assert "cached" in second.source and second.tokens.tolist() == first.tokens.tolist()
    b = TokenBatches([second], _config(tmp_path), seed=0, vocab_size=tok.vocab_size).train_batch(0, 0, 0)
    assert b.x_BS.shape == (2, 16)
    # a changed input file is a new cache entry
    monkeypatch.undo()
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "other " * 400}) + "\n" + json.dumps({"text": "x" * 99})
    )
    [third] = load_corpus(_config(tmp_path), cache)
    assert "tokenized" in third.source and len(list(cache.glob("hf-*.idx"))) == 2


@pytest.mark.parametrize("kind", ["parquet", "arrow_dir", "text"])
def test_parquet_save_to_disk_and_text_sources(tmp_path: Path, kind: str) -> None:
    import datasets

    tok = small_tokenizer(tmp_path)
    texts = [f"line {i} of the corpus" for i in range(30)]
    ds = datasets.Dataset.from_dict({"text": texts})
    hf: dict = {"path": kind, "data_files": [str(tmp_path / "in.*")]}
    if kind == "parquet":
        ds.to_parquet(str(tmp_path / "in.parquet"))
    elif kind == "text":
        (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        hf = {"path": str(tmp_path / "saved")}
    cfg = DataConfig(hf=hf, tokenizer={"kind": "hf", "path": str(tmp_path / "tok.json")}, seq_len=8)
    [corpus] = load_corpus(cfg, tmp_path / "cache")
    assert len(corpus.doc_bounds) == 31
    eos = tok.eos_id
    assert tok.decode([t for t in corpus.tokens[: corpus.doc_bounds[2]].tolist() if t != eos]) == "".join(
        texts[:2]
    )


def test_text_field_not_in_the_records_names_the_field_and_file(tmp_path: Path) -> None:
    small_tokenizer(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"body": "hello"}\n')
    with pytest.raises(
        DataError, match=r"data.hf.text_field: 'text' is not a field of .*a.jsonl \(fields: \['body'\]\)"
    ):
        load_corpus(_config(tmp_path), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("hf-*"))  # nothing half-written


def test_missing_local_files_and_both_sources_are_errors(tmp_path: Path) -> None:
    small_tokenizer(tmp_path)
    with pytest.raises(DataError, match="matches no file"):
        load_corpus(_config(tmp_path), tmp_path / "cache")
    with pytest.raises(ValueError, match="use data.hf or data.paths, not both"):
        DataConfig(paths=["x"], hf={"path": "json", "data_files": ["a.jsonl"]})
