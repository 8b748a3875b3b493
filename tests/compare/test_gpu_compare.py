"""tools/gpu_compare.sh on CPU: the dry run of the shipped GPU presets, and the whole flow (prepare,
train 2 arms x 2 seeds, copy the results without checkpoints) on a tiny preset made from the real one."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_compare.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PY": sys.executable, **env},
    )


@pytest.mark.slow
def test_dry_run_validates_both_gpu_presets_and_trains_nothing(tmp_path: Path) -> None:
    proc = run_script("--dry-run", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr
    assert "4 runs valid: hf_lbl_seed1, lpr_seed1, hf_lbl_seed2, lpr_seed2" in proc.stdout
    assert "4 runs valid: seq_lbl_seed1, simbal_seed1, seq_lbl_seed2, simbal_seed2" in proc.stdout
    assert "--variants seq_lbl,simbal --seeds 1,2" in proc.stdout
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
    bad = run_script("--dry-run", "no_such_preset")
    assert bad.returncode == 2 and "no preset 'no_such_preset'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_shuffled_files_mix_the_sources_and_carried_data_is_used_as_is(tmp_path: Path) -> None:
    import hashlib

    from moe_dist.compare.prepare import _inputs, prepare_data
    from moe_dist.compare.presets import PrepareSpec
    from moe_dist.data.errors import DataError
    from moe_dist.data.indexed_dataset import read_indexed

    for src in ("a", "b"):
        (tmp_path / src).mkdir()
        for i in range(6):
            (tmp_path / src / f"{i}.txt").write_text(f"{src} document {i} " * 30)
    inputs = [str(tmp_path / "a" / "*.txt"), str(tmp_path / "b" / "*.txt")]
    spec = PrepareSpec(inputs=inputs, vocab_size=300, dir=str(tmp_path / "d"), shuffle_files=True)
    files = _inputs(spec)
    assert files == sorted(files, key=lambda f: hashlib.sha256(str(f).encode()).hexdigest())
    assert sorted(files) == sorted(_inputs(spec.model_copy(update={"shuffle_files": False})))
    plain = _inputs(spec.model_copy(update={"shuffle_files": False}))
    assert [f.parent.name for f in plain] == ["a"] * 6 + ["b"] * 6  # unshuffled: source after source
    prepare_data(spec, say=lambda m: None)
    assert read_indexed(tmp_path / "d" / "corpus").num_documents == 12
    # Inputs gone (a machine without the packages): the matching stamp is used, with a note.
    for f in files:
        f.unlink()
    notes: list[str] = []
    assert prepare_data(spec, say=notes.append)["paths"] == [str(tmp_path / "d" / "corpus")]
    assert "not re-checked" in notes[0]
    with pytest.raises(DataError, match="no files match"):  # a stamp of another spec is not used
        prepare_data(spec.model_copy(update={"vocab_size": 301}), say=notes.append)


def tiny_gpu_preset(tmp: Path) -> Path:
    """simbal_paper_gpu.yaml with a tiny model and its prepare section pointed at a few text files."""
    data = yaml.safe_load((ROOT / "configs" / "compare" / "simbal_paper_gpu.yaml").read_text())
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"d{i}.txt").write_text(f"Document {i}: the experts route tokens by similarity. " * (20 + i))
    prepare = {"inputs": [str(docs / "*.txt")], "vocab_size": 300, "dir": str(tmp / "data")}
    data["compare"]["prepare"] |= prepare
    data["compare"]["pes_tokens"] = 32
    data["compare"]["last_n"] = 2
    data["model"] |= {"vocab_size": 300, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}
    data["model"]["moe"]["experts"]["ffn_hidden_size"] = 32
    data["model"]["moe"]["num_experts"] = 8
    data["data"] |= {"seq_len": 32, "micro_batch_size": 2}
    data["schedule"] |= {"steps": 4, "warmup_steps": 1}
    data["eval"] |= {"every": 2, "batches": 1}
    data["checkpoint"]["every"] = 2
    path = tmp / "tiny_gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_prepare_then_run_writes_results_without_checkpoints(tmp_path: Path) -> None:
    preset = tiny_gpu_preset(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    missing = run_script(str(preset), OUT=str(out), WORK=str(work))
    assert missing.returncode == 1 and "--prepare" in missing.stderr  # never prepares in the timed run
    prep = run_script("--prepare", str(preset))
    assert prep.returncode == 0, prep.stderr
    # The GPU machine has the prepared folder but not the inputs: the stamp is used as it is.
    for f in (tmp_path / "docs").iterdir():
        f.unlink()
    proc = run_script(str(preset), OUT=str(out), WORK=str(work))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dest = out / "tiny_gpu"
    results = json.loads((dest / "results.json").read_text())
    assert set(results["rows_per_seed"]) == {"1", "2"}
    assert {r["variant"] for r in results["rows_per_seed"]["1"]} == {"seq_lbl", "simbal"}
    logs = sorted(p.name for p in (dest / "logs").glob("*.metrics.jsonl.gz"))
    assert logs == [f"{a}_seed{s}.metrics.jsonl.gz" for a in ("seq_lbl", "simbal") for s in (1, 2)]
    recs = [json.loads(x) for x in gzip.decompress((dest / "logs" / logs[0]).read_bytes()).splitlines()]
    assert recs[-1]["step"] == 4
    assert int((dest / "wall_seconds.txt").read_text()) >= 0 and (dest / "results.md").is_file()
    assert not list(out.rglob("checkpoints")) and list(work.rglob("checkpoints"))
