"""Peak memory and MFU: the FLOPs-per-token formula on the tiny model by hand, the GPU table, MFU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import tiny_config

from moe_dist.models import build_model
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.utilization import (
    Utilization,
    active_params,
    flops_per_token,
    peak_memory_bytes,
    peak_tflops_for,
)


def test_flops_per_token_of_the_tiny_model_by_hand(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "parallel.ep_size=1")
    model = build_model(cfg.model, ParallelGroups.single())
    H, F, V, E, L, S = 32, 64, 256, 4, 2, 32
    per_layer = (H * 3 * H) + H * H + 2 * H + H * E  # wqkv, wo, two RMSNorms, router
    dense = L * per_layer + H + V * H  # + final norm + output projection (tied: the embedding)
    experts = L * 2 * (3 * H * F)  # top-2 SwiGLU experts per layer
    assert active_params(model, cfg) == dense + experts == 41376
    assert flops_per_token(model, cfg) == 6 * (dense + experts) + 12 * L * H * S


def test_peak_table_and_memory() -> None:
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA L40S") == 362.0
    assert peak_tflops_for("NVIDIA B200") == 2250.0
    assert peak_tflops_for("Tesla T4") is None
    assert peak_memory_bytes(torch.device("cpu")) > 10 * 2**20  # max RSS in bytes, not KiB


def test_mfu_on_cuda_and_none_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, "parallel.ep_size=1")
    model = build_model(cfg.model, ParallelGroups.single())
    groups = ParallelGroups.single()
    said: list[str] = []
    cpu = Utilization.for_run(cfg, model, torch.device("cpu"), groups, said.append)
    assert cpu.fields([123.0], 1000.0) == {"peak_memory_bytes": [123]}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = Utilization.for_run(cfg, model, torch.device("cuda", 0), groups, said.append)
    fields = cuda.fields([1.0], 1e6)
    assert fields["mfu"] == pytest.approx(flops_per_token(model, cfg) * 1e6 / 989e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    unknown = Utilization.for_run(cfg, model, torch.device("cuda", 0), groups, said.append)
    assert "mfu" not in unknown.fields([1.0], 1e6) and "run.peak_tflops" in said[-1]
    cfg.run.peak_tflops = 65.0
    t4 = Utilization.for_run(cfg, model, torch.device("cuda", 0), groups, said.append)
    assert t4.fields([1.0], 1e6)["mfu"] == pytest.approx(flops_per_token(model, cfg) * 1e6 / 65e12)
