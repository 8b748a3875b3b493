"""Training on a Megatron indexed dataset: a BPE trained here, prepare-data, both engines at EP=2, resume."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported here or in workers

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from cli_helpers import run_cli  # noqa: E402
from data_helpers import small_tokenizer, stdlib_texts  # noqa: E402
from rank_processes import run_on_ranks  # noqa: E402
from train_helpers import tiny_config, train_body  # noqa: E402

from moe_dist.config import Config  # noqa: E402
from moe_dist.data.tokenizer import EOS_TOKEN, HFTokenizer  # noqa: E402


def prepared(tmp: Path) -> tuple[Path, list[str]]:
    """A BPE (vocabulary 600) and an indexed dataset of 24 stdlib modules; (prefix, their texts)."""
    small_tokenizer(tmp)
    files = stdlib_texts()
    proc = run_cli(
        "prepare-data", *map(str, files), "--tokenizer", str(tmp / "tok.json"), "-o", str(tmp / "ds")
    )
    assert proc.returncode == 0, proc.stderr
    return tmp / "ds", [f.read_text() for f in files]


def indexed_config(tmp: Path, prefix: Path, *overrides: str) -> Config:
    return tiny_config(
        tmp,
        f"data.paths=[{prefix}]",
        "data.tokenizer.kind=hf",
        f"data.tokenizer.path={tmp / 'tok.json'}",
        "model.vocab_size=640",  # padded past the tokenizer's 600
        "parallel.ep_size=2",
        *overrides,
    )


def first_batch_and_train(rank: int, world_size: int, cfg: Config) -> dict[str, Any]:
    from moe_dist.data.batches import TokenBatches

    x_BS = TokenBatches.for_run(cfg).train_batch(0, 0, rank).x_BS
    return {"first": x_BS.tolist(), **train_body(rank, world_size, cfg)}


@pytest.mark.slow
def test_native_ep2_trains_on_a_bpe_indexed_dataset_and_the_first_batch_decodes_to_the_text(
    tmp_path: Path,
) -> None:
    prefix, texts = prepared(tmp_path)
    cfg = indexed_config(
        tmp_path, prefix, "schedule.steps=3", "schedule.warmup_steps=1", "data.document_mask=true"
    )
    out = run_on_ranks(first_batch_and_train, 2, (cfg,))
    tok = HFTokenizer(tmp_path / "tok.json")
    stream = "".join(t + EOS_TOKEN for t in texts)
    for rank in (0, 1):
        for row in out[rank]["first"]:
            assert tok.decode(row) in stream  # packed across documents, EOS between them
    assert out[0]["first"] != out[1]["first"]
    assert sorted(out[0]["losses"]) == [1, 2, 3] and out[0]["losses"] == out[1]["losses"]
    assert 5.0 < out[0]["losses"][1] < 7.5  # about ln(640): the padded vocabulary
    assert "padded to model.vocab_size 640" in out[0]["log"] and f"{prefix}.bin" in out[0]["log"]


@pytest.mark.slow
def test_kill_and_resume_on_an_indexed_dataset_is_exact(tmp_path: Path) -> None:
    prefix, _ = prepared(tmp_path)
    run = ("schedule.steps=8", "schedule.warmup_steps=2", "checkpoint.every=4")
    full = run_on_ranks(train_body, 2, (indexed_config(tmp_path, prefix, *run, "run.name=full"),))[0]
    cfg = indexed_config(tmp_path, prefix, *run, "run.name=killed")
    run_on_ranks(train_body, 2, (cfg, None, 6))  # dies after step 6: the checkpoint of step 4 is newest
    resumed = run_on_ranks(train_body, 2, (cfg, ""))[0]
    assert sorted(resumed["losses"]) == [5, 6, 7, 8]
    assert {s: resumed["losses"][s] for s in range(5, 9)} == {s: full["losses"][s] for s in range(5, 9)}


def _deepspeed_body(rank: int, world_size: int, cfg: Config) -> dict[str, Any]:
    from moe_dist.integrations.deepspeed_engine import DeepSpeedEngine
    from moe_dist.training.run import train

    result = train(cfg, DeepSpeedEngine)
    return {"losses": result.losses}


@pytest.mark.slow
def test_deepspeed_ep2_trains_on_an_indexed_dataset(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    prefix, _ = prepared(tmp_path)
    cfg = indexed_config(
        tmp_path, prefix, "schedule.steps=3", "schedule.warmup_steps=1", "parallel.engine=deepspeed",
        "parallel.zero_stage=1", "run.device=cpu", "data.document_mask=true",
    )  # fmt: skip
    out = run_on_ranks(_deepspeed_body, 2, (cfg,))
    losses = out[0]["losses"]
    assert sorted(losses) == [1, 2, 3] and losses == out[1]["losses"]
    assert all(5.0 < v < 7.5 for v in losses.values()), losses
