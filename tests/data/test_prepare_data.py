"""``moe-dist prepare-data``: documents (files, .jsonl records) with EOS, an indexed dataset; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run_cli
from data_helpers import small_tokenizer

from moe_dist.config import DataConfig
from moe_dist.data.batches import TokenBatches
from moe_dist.data.corpus import load_corpus
from moe_dist.data.errors import DataError
from moe_dist.data.indexed_dataset import read_indexed


def test_jsonl_records_and_files_become_documents_with_eos(tmp_path: Path) -> None:
    tok = small_tokenizer(tmp_path)
    records = [{"text": f"def f{i}(x):\n    return x + {i}\n", "id": i} for i in range(50)]
    records.insert(3, {"text": ""})  # an empty record is skipped
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "b.txt").write_text("import json\n")
    prefix = tmp_path / "out" / "ds"
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]
    proc = run_cli("prepare-data", *inputs, "--tokenizer", str(tmp_path / "tok.json"), "-o", str(prefix))
    assert proc.returncode == 0, proc.stderr
    assert "51 documents" in proc.stdout and "uint16" in proc.stdout and "skipped 1 empty" in proc.stdout
    data = read_indexed(prefix)
    texts = [r["text"] for r in records if r["text"]] + ["import json\n"]
    for d, text in enumerate(texts):
        ids = data.tokens[data.doc_bounds[d] : data.doc_bounds[d + 1]].tolist()
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text


def test_bytes_prepare_data_without_tokenizer_and_the_old_token_check(tmp_path: Path) -> None:
    src = tmp_path / "text.txt"
    src.write_bytes(b"hello world\n" * 500)
    proc = run_cli("prepare-data", str(src), "-o", str(tmp_path / "tokens"))
    assert proc.returncode == 0, proc.stderr
    data = read_indexed(tmp_path / "tokens")
    assert len(data.tokens) == 6000 and bytes(data.tokens[:12].astype("uint8")) == b"hello world\n"
    cfg = DataConfig(paths=[str(tmp_path / "tokens")], seq_len=32)
    x_BS = TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=256).train_batch(0, 0, 0).x_BS
    assert x_BS.shape == (8, 32)


def test_a_token_id_past_model_vocab_size_names_the_file(tmp_path: Path) -> None:
    small_tokenizer(tmp_path)
    (tmp_path / "t.txt").write_text("x = [1, 2, 3]\n" * 400)
    args = [str(tmp_path / "t.txt"), "--tokenizer", str(tmp_path / "tok.json"), "-o", str(tmp_path / "ds")]
    assert run_cli("prepare-data", *args).returncode == 0
    cfg = DataConfig(paths=[str(tmp_path / "ds")], seq_len=16)
    top = int(read_indexed(tmp_path / "ds").tokens.max())
    with pytest.raises(DataError, match=rf"ds.bin holds token id {top} >= model.vocab_size \(256\)"):
        TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=256)
    TokenBatches(load_corpus(cfg), cfg, seed=0, vocab_size=top + 1)


@pytest.mark.parametrize(
    "case", ["empty_file", "all_empty_records", "missing_field", "not_json", "missing_input"]
)
def test_bad_inputs_exit_2_naming_the_file_and_write_nothing(tmp_path: Path, case: str) -> None:
    small_tokenizer(tmp_path)
    src = tmp_path / ("in.txt" if case == "empty_file" else "in.jsonl")
    content = {
        "empty_file": "",
        "all_empty_records": '{"text": ""}\n{"text": ""}\n',
        "missing_field": '{"text": "a"}\n{"body": "b"}\n',
        "not_json": '{"text": "a"}\nnot json\n',
        "missing_input": None,
    }[case]
    if content is not None:
        src.write_text(content)
    proc = run_cli(
        "prepare-data", str(src), "--tokenizer", str(tmp_path / "tok.json"), "-o", str(tmp_path / "o" / "ds")
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    expected = {
        "empty_file": "no non-empty documents",
        "all_empty_records": "no non-empty documents (2 empty)",
        "missing_field": "line 2 has no field 'text' (it has ['body'])",
        "not_json": "line 2 is not JSON",
        "missing_input": "does not exist",
    }[case]
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert str(src) in proc.stderr or case in ("empty_file", "all_empty_records")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
