"""``moe-dist export-hf`` refusals through the real CLI: one line naming what and why, exit 2,
nothing written at OUT_DIR (nor beside it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import run_cli

pytestmark = pytest.mark.slow  # each case runs the CLI (seconds); some train a run for one step first


def refused(checkpoint: Path, tmp_path: Path, *args: str) -> str:
    """Run the export into ``tmp_path/out/hf``; check the refusal's form and return its message."""
    parent = tmp_path / "out"
    parent.mkdir()
    proc = run_cli("export-hf", str(checkpoint), "-o", str(parent / "hf"), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert list(parent.iterdir()) == []  # no OUT_DIR, no temporary directory
    return lines[0]


def test_missing_checkpoint(tmp_path: Path) -> None:
    msg = refused(tmp_path / "no_such_run", tmp_path)
    assert "no_such_run: no such checkpoint or run directory" in msg


def test_run_without_checkpoints(mixtral_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text((mixtral_run / "config.json").read_text())
    assert "no checkpoint in" in refused(empty, tmp_path)


@pytest.mark.parametrize(
    ("router", "overrides", "why"),
    [
        ("topk_sigmoid_bias", ["model.moe.router.name=topk_sigmoid_bias"], "sigmoid scores"),
        (
            "expert_choice",
            ["model.moe.router.name=expert_choice", "model.moe.losses=[]"],
            "experts choose their tokens",
        ),
    ],
)
def test_routers_without_a_counterpart(
    router: str, overrides: list[str], why: str, trained_run: Callable[..., Path], tmp_path: Path
) -> None:
    run = trained_run(router, *overrides, steps=1)
    msg = refused(run, tmp_path)
    assert f"model.moe.router.name: {router} ({why}" in msg and "softmax over the experts then top-k" in msg


def test_drops_shared_experts_and_gelu_named_together(
    trained_run: Callable[..., Path], tmp_path: Path
) -> None:
    run = trained_run(
        "drops",
        "model.moe.capacity_factor=1.0",
        "model.moe.shared_experts.count=1",
        "model.moe.shared_experts.ffn_hidden_size=16",
        "model.moe.experts.activation=gelu",
        "model.moe.router.bias_update_rate=0.001",
        steps=1,
    )
    msg = refused(run, tmp_path, "--arch", "qwen3_moe")
    for what in (
        "model.moe.capacity_factor: 1.0",
        "model.moe.shared_experts.count: 1",
        "activation: gelu",
        "model.moe.router.bias_update_rate: 0.001",  # the loss-free bias has no HF counterpart
    ):
        assert what in msg
    assert "model.qk_norm: false" in msg  # and Qwen3 needs QK-norm


def test_qwen3_model_as_mixtral(qwen3_run: Path, tmp_path: Path) -> None:
    msg = refused(qwen3_run, tmp_path, "--arch", "mixtral")
    assert msg.startswith("error: cannot export as mixtral: ")
    for what in ("renormalize: false", "model.dense_layers: 1", "model.qk_norm: true"):
        assert what in msg


def test_non_empty_out_dir_is_kept(mixtral_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    proc = run_cli("export-hf", str(mixtral_run), "-o", str(out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
