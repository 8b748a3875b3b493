"""The console shows the MoE: one line per log step with the loss, each aux term, the gradient
norm, the learning rate, the load balance (mean Gini, worst MaxVio), peak memory and tokens/s
over the whole log interval; the run directory at the start and a line per saved checkpoint."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from train_helpers import tiny_config

from moe_dist.training.engines import engine_for
from moe_dist.training.run import train


def test_log_lines_show_the_moe_and_tokens_per_second_of_the_interval(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "parallel.ep_size=1",
        "schedule.steps=8",
        "run.log_every=4",
        "checkpoint.every=4",
        "eval.every=0",
        "model.moe.losses=[{name: switch, coef: 0.01}, {name: z_loss, coef: 0.001}]",
    )
    stream = io.StringIO()
    train(cfg, engine_for(cfg), stream=stream)
    out = stream.getvalue()
    run_dir = tmp_path / "runs" / "t"
    assert f"run directory: {run_dir.resolve()}" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["4/8", "8/8"]  # one line per log step
    for field in ("loss", "switch", "z_loss", "grad", "lr", "gini", "maxvio", "mem", "tok/s"):
        assert re.search(rf"(^|\s){re.escape(field)}(\s|$)", lines[0]), (field, lines[0])
    assert "val " in lines[1] and "val " not in lines[0]
    assert out.count("checkpoint: step 4 saved in") == 1 and out.count("checkpoint: step 8 saved in") == 1
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))  # still one record per step
    # tokens/s is the interval's: the four steps of an interval share one value, and the line shows it
    for interval in (records[:4], records[4:]):
        assert len({r["tokens_per_s"] for r in interval}) == 1
    shown = float(lines[1].split(" tok/s")[0].split()[-1].replace(",", ""))
    assert abs(shown - records[-1]["tokens_per_s"]) <= 1.0
    gini_mean = sum(layer["gini"] for layer in records[3]["layers"]) / len(records[3]["layers"])
    assert f"gini {gini_mean:.3f}" in lines[0]
