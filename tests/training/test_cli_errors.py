"""Bad configs through the real CLI: one clear message each, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_cli

# (command, --set overrides, text the message must contain)
CASES = [
    ("check", ["model.dim=big"], "model.dim: Input should be a valid integer"),
    ("check", ["model.moe.router.top_k=12"], "model.moe.router.top_k: must be <= num_experts (8), got 12"),
    ("check", ["parallel.ep_size=3"], "parallel.ep_size: must divide model.moe.num_experts (8), got 3"),
    ("train", [], "parallel.ep_size: must divide the world size (1), got 2"),
    ("check", ["model.moe.router.name=nope"], "model.moe.router.name: unknown router 'nope'"),
    ("check", ["data.paths=[/no/such/corpus.txt]"], "data.paths: '/no/such/corpus.txt' does not exist"),
    (
        "train",
        ["parallel.ep_size=1", "data.paths=[/no/such/dir]"],
        "data.paths: '/no/such/dir' does not exist",
    ),
    (
        "check",
        ["model.moe.losses.0.coef=-0.5"],
        "model.moe.losses.0.coef: Input should be greater than or equal to 0",
    ),
    ("check", ["optim.weight_decay=-1"], "optim.weight_decay: Input should be greater than or equal to 0"),
    ("check", ["model.moe.experts.ffn_hiden_size=64"], "model.moe.experts.ffn_hiden_size: unknown key"),
    ("check", ["schedule.warmup_steps=5000"], "schedule.warmup_steps: must be <= schedule.steps"),
    ("check", ["data.seq_len=512"], "data.seq_len: must be <= model.max_seq_len (128), got 512"),
    ("check", ["model.moe.losses.0.name=nope"], "model.moe.losses.0.name: unknown"),
    ("check", ["model.n_heads=3"], "model.dim: must be divisible by model.n_heads (3), got 128\n"),
    ("check", ["model.dim"], "--set 'model.dim': expected KEY=VALUE"),
    (
        "check",
        ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
        "parallel.zero_stage: DeepSpeed MoE layers do not support ZeRO stage 3",
    ),
    (
        "train",
        ["parallel.ep_size=1", "parallel.data_parallel=fsdp"],
        "parallel.data_parallel: fsdp shards over the data-parallel ranks, and a single process has none",
    ),
    ("check", ["checkpoint.async=true"], "checkpoint.async: needs checkpoint.format dcp"),
    (
        "check",
        ["parallel.data_parallel=fsdp", "checkpoint.format=torch"],
        "checkpoint.format: torch gathers the whole model on rank 0; under fsdp use dcp",
    ),
    (
        "check",
        ["parallel.engine=deepspeed", "parallel.data_parallel=fsdp"],
        "parallel.data_parallel: fsdp is the native engine's",
    ),
]


@pytest.mark.parametrize(("command", "overrides", "message"), CASES, ids=[c[2][:40] for c in CASES])
def test_bad_config_gives_one_clear_message(command: str, overrides: list[str], message: str) -> None:
    args = [a for o in overrides for a in ("--set", o)]
    proc = run_cli(command, "configs/demo.yaml", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_several_errors_are_reported_at_once() -> None:
    proc = run_cli(
        "check",
        "configs/demo.yaml",
        "--set",
        "optim.lr=0",
        "--set",
        "model.moe.router.top_k=9",
        "--set",
        "run.bogus=1",
    )
    assert proc.returncode == 2
    for text in ("optim.lr:", "model.moe.router.top_k:", "run.bogus: unknown key"):
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file() -> None:
    proc = run_cli("check", "configs/nope.yaml")
    assert proc.returncode == 2 and "config file not found: configs/nope.yaml" in proc.stderr


def test_fresh_train_refuses_a_run_dir_with_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "demo" / "checkpoints" / "step_000010").mkdir(parents=True)
    proc = run_cli(
        "train",
        "configs/demo.yaml",
        "--set",
        "parallel.ep_size=1",
        "--set",
        f"run.out_dir={tmp_path}",
        "--set",
        "data.max_bytes=100000",
    )
    assert proc.returncode == 2, proc.stderr
    assert "already has checkpoints (newest step_000010); continue it with --resume" in proc.stderr
    assert "Traceback" not in proc.stderr
