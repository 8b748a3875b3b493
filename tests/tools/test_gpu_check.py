"""``tools/gpu_check.sh --dry-run`` on CPU: the script parses, names every check it would run (GPU
tests, the layer benchmark, the training benchmark of each GPU config) and exits 0; every config it
benchmarks exists and validates."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tools.bench_train import training_config

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_lists_every_check(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    names = (tmp_path / "summary.txt").read_text().split()
    assert {"env", "tests_gpu", "bench_layer_cuda", "bench_layer_cuda_accumulated"} <= set(names)
    configs = re.findall(r"tools/bench_train.py (\S+\.yaml)", proc.stdout)
    assert len(configs) >= 4 and any("mixtral_gpu" in c for c in configs)
    overrides = ["data.paths=[]", "data.tokenizer.kind=bytes", "run.device=cpu"]
    for cfg in configs:  # each loads as the benchmark will load it (a preset: its baseline arm)
        assert training_config(str(ROOT / cfg), overrides, None).model.moe.num_experts > 1, cfg
