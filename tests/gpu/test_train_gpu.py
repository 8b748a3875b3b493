"""Training on CUDA: the expert GEMMs of a real training step run in bf16 (run.precision auto), steady
steps never synchronise the host (``run.sync_debug: error``), MFU is reported, and EP = 2 runs as
two processes on one GPU over gloo.

Run on the device machine (tests/gpu/README.md).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rank_processes import run_on_ranks

from moe_dist.config import load_config
from moe_dist.ops import grouped_expert_mlp
from moe_dist.training.engines import engine_for
from moe_dist.training.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, *overrides: str):  # noqa: ANN202
    return load_config(
        ROOT / "configs" / "models" / "mixtral_tiny.yaml",
        [
            "parallel.ep_size=1",
            "run.device=cuda",
            f"run.out_dir={tmp_path}",
            "schedule.steps=12",
            "schedule.warmup_steps=2",
            "run.log_every=6",
            "eval.every=0",
            "eval.batches=2",
            "checkpoint.every=0",
            "data.max_bytes=2000000",
            *overrides,
        ],
    )


def test_training_step_runs_expert_gemms_in_bf16_without_host_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dtypes: set[tuple[torch.dtype, torch.dtype]] = set()
    real = grouped_expert_mlp._grouped_mm

    def spy(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        dtypes.add((a.dtype, b.dtype))
        return real(a, b, offs)

    monkeypatch.setattr(grouped_expert_mlp, "_grouped_mm", spy)
    cfg = _config(tmp_path, "run.sync_debug=error")  # a synchronising steady step raises
    stream = io.StringIO()
    result = train(cfg, engine_for(cfg), stream=stream)
    assert dtypes == {(torch.bfloat16, torch.bfloat16)}, dtypes
    assert "bf16 compute" in stream.getvalue(), stream.getvalue()
    assert "mfu" in stream.getvalue() and len(result.losses) == 12
    assert result.losses[12] < result.losses[1]


def _gloo_body(rank: int, world_size: int, tmp: str, ep_size: int, transport: str) -> dict:
    overrides = (f"parallel.ep_size={ep_size}", "parallel.backend=gloo", f"parallel.ep_transport={transport}")
    cfg = _config(Path(tmp), *overrides)
    return {"losses": train(cfg, engine_for(cfg), stream=io.StringIO()).losses}


@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_ep2_two_processes_on_one_gpu_over_gloo(tmp_path: Path, transport: str) -> None:
    """NCCL refuses two ranks on one GPU; gloo carries CUDA tensors (through host copies) for the
    collectives it supports. EP = 2 must give the losses of DP = 2 (EP = 1) on the same data, to
    bf16 precision."""
    dp2 = run_on_ranks(_gloo_body, 2, (str(tmp_path / "dp2"), 1, "collective"))
    ep2 = run_on_ranks(_gloo_body, 2, (str(tmp_path / transport), 2, transport))
    for step, loss in dp2[0]["losses"].items():
        assert ep2[0]["losses"][step] == pytest.approx(loss, rel=2e-2), step
