"""A steady training step that neither logs, evaluates nor checkpoints makes no tensor-to-host read
from moe_dist code (``tools/host_reads.py`` wraps ``Tensor.item/tolist/cpu/numpy/__float__/
__int__/__bool__/__index__``): on a GPU each would stall the launch queue. The CPU run takes the
GPU's expert path (``experts.backend: grouped_mm``); the CPU's own per-expert loop reads each
layer's counts once, by design (it sizes one GEMM per expert on the host).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from train_helpers import tiny_data

from tools.host_reads import per_step_reads


def _config(tmp_path: Path, *overrides: str) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_data(tmp_path, "parallel.ep_size=1", *overrides)))
    return str(path)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("run.precision=bf16", "data.grad_accum=2"),
        ("model.moe.router.name=topk_sigmoid_bias",),
        ("model.moe.router.name=lpr", "model.moe.router.ema_keys=true"),
        ("model.moe.losses=[{name: global_batch, coef: 0.01}]",),
    ],
    ids=["fp32", "bf16_accum", "aux_free_bias", "lpr_ema", "global_batch_loss"],
)
def test_steady_steps_make_no_host_reads_on_the_gpu_path(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    per_step, sites = per_step_reads(
        _config(tmp_path, "model.moe.experts.backend=grouped_mm", *overrides), [], steps=3
    )
    assert per_step == 0, sites


def test_the_cpu_loop_reads_each_layers_counts_once(tmp_path: Path) -> None:
    per_step, sites = per_step_reads(_config(tmp_path, "model.moe.experts.backend=loop"), [], steps=3)
    assert per_step == 2, sites  # tiny.yaml: 2 MoE layers
    assert all("layers/experts.py" in site for site in sites), sites
