"""docs/data.md's "From text to training, step by step" runs as written (issue 28): the block's
commands, in a folder with a small corpus, each exit 0 (run in this process through
``moe_dist.cli.main``, as the ``moe-dist`` script does); only the train line gets a shorter,
smaller run. Before the fix the train line failed with ``parallel.ep_size: must divide the world
size (1), got 2`` while ``check`` said OK."""

from __future__ import annotations

import re
import shlex
import shutil
import sysconfig
from pathlib import Path

import pytest

from moe_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHORTER = ["schedule.steps=2", "schedule.warmup_steps=0", "eval.every=0", "model.n_layers=1"]


def recipe() -> list[list[str]]:
    text = (ROOT / "docs" / "data.md").read_text()
    block = re.search(r"## From text to training.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [x for x in block.replace("\\\n", " ").splitlines() if x.strip() and not x.startswith("#")]
    return [shlex.split(x) for x in lines]


@pytest.mark.slow
def test_text_to_training_recipe_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = recipe()
    assert [c[:2] for c in commands] == [
        ["moe-dist", "train-tokenizer"],
        ["moe-dist", "prepare-data"],
        ["moe-dist", "check"],
        ["moe-dist", "train"],
    ]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, name in enumerate(["json/decoder.py", "json/encoder.py", "csv.py", "textwrap.py", "shlex.py"]):
        dest = tmp_path / "corpus" / f"part{i % 2}" / f"{Path(name).stem}.txt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib / name, dest)
    monkeypatch.chdir(tmp_path)  # configs/demo.yaml: the shipped one (not in this folder)
    for cmd in commands:
        argv = cmd[1:] + ([x for s in SHORTER for x in ("--set", s)] if cmd[1] == "train" else [])
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{shlex.join(cmd)}:\n{out[-2000:]}\n{err[-3000:]}"
        if cmd[1] == "train-tokenizer":
            assert "--set model.vocab_size=" in out
    assert (tmp_path / "runs" / "demo" / "metrics.jsonl").is_file()
