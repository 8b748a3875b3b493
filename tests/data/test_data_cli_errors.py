"""Bad data through the real CLI (check and train): one message naming the file and the problem, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli

from moe_dist.data.indexed_dataset import IndexedDatasetWriter

SMALL = [
    "parallel.ep_size=1",
    "model.vocab_size=256",
    "data.seq_len=16",
    "schedule.steps=1",
    "schedule.warmup_steps=0",
]


def _write(prefix: Path, top: int) -> None:
    with IndexedDatasetWriter(prefix, np.dtype(np.uint16)) as w:
        for _ in range(40):
            w.add_document(np.r_[np.arange(1, 30) % top, top])


@pytest.mark.parametrize(
    ("case", "command", "message"),
    [
        ("no_bin", "check", "has no data file"),
        ("truncated_bin", "check", "truncated or from another run"),
        ("no_idx", "check", "has no index"),
        ("token_past_vocab", "train", "holds token id 300 >= model.vocab_size (256)"),
        ("hf_text_field", "train", "data.hf.text_field: 'text' is not a field of"),
        ("empty_documents", "train", "no non-empty documents"),
    ],
)
def test_bad_data_exits_2_with_one_message(tmp_path: Path, case: str, command: str, message: str) -> None:
    prefix = tmp_path / "ds"
    _write(prefix, 300 if case == "token_past_vocab" else 200)
    named = f"{prefix}.bin"
    if case == "no_bin":
        Path(f"{prefix}.bin").unlink()
        named = f"{prefix}.idx"
    elif case == "truncated_bin":
        Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:100])
    elif case == "no_idx":
        Path(f"{prefix}.idx").unlink()
    source = [f"data.paths=[{prefix}]"]
    if case.startswith(("hf", "empty")):
        from data_helpers import small_tokenizer

        small_tokenizer(tmp_path)
        records = [{"body": "x"}] if case == "hf_text_field" else [{"text": ""}, {"text": ""}]
        named = str(tmp_path / "r.jsonl")
        Path(named).write_text("".join(json.dumps(r) + "\n" for r in records))
        source = [
            f'data.hf={{path: json, data_files: ["{named}"]}}',
            "data.tokenizer.kind=hf",
            f"data.tokenizer.path={tmp_path / 'tok.json'}",
            "model.vocab_size=640",
        ]
    overrides = [*SMALL, f"run.out_dir={tmp_path / 'runs'}", *source]
    proc = run_cli(command, "configs/demo.yaml", *[a for o in overrides for a in ("--set", o)])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and named in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    cache = tmp_path / "runs" / "demo" / "data_cache"
    assert not list(cache.glob("hf-*")) if cache.exists() else True  # nothing half-written
