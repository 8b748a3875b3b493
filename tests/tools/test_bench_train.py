"""``tools/bench_train.py`` on CPU, the smoke test CI runs: a few steps of a small config, a table on
stdout, JSON with the fields a GPU run fills (MFU and the profiled host gaps are CUDA-only), and a
bad flag or config refused with one message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from train_helpers import tiny_data

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_train.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_bench_train_on_cpu_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_data(tmp_path, "data.grad_accum=2")))
    out = tmp_path / "bench.json"
    proc = _run(str(config), "--steps", "3", "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["steps"] == 3
    assert result["tokens_per_step"] == 2 * 4 * 32  # grad_accum x micro-batch x seq_len of tiny.yaml
    assert result["tokens_per_s"] > 0 and result["peak_memory_bytes"] > 0
    phases = result["breakdown_s"]
    assert set(phases) == {"forward", "backward", "reduce_clip", "optimizer"} and all(
        v > 0 for v in phases.values()
    )
    # the phases are inside the step: together no more than the step's wall time
    assert sum(phases.values()) <= result["seconds_per_step"] * 1.05
    assert "tok/s" in proc.stdout and "forward" in proc.stdout
    # the profiled steps (tools/step_profile.py): no kernels on CPU, the host's ops by self time
    prof = result["profiled"]
    assert prof["device_busy_s_per_step"] == 0 and prof["kernels_per_step"] == 0
    names = [r["name"] for r in prof["top_host_ops"]]
    assert any("mm" in n for n in names), names  # the GEMMs are among the host's top ops on CPU
    assert all(r["ms_per_step"] > 0 and r["calls_per_step"] > 0 for r in prof["top_host_ops"])


def test_bench_train_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: {dim: 30, n_heads: 4}\n")
    proc = _run(str(config), "--steps", "1")
    assert proc.returncode == 2 and "model.dim" in proc.stderr and "Traceback" not in proc.stderr
