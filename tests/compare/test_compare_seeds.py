"""Seeds as an axis of ``moe-dist compare``: statistics recomputed from the run logs, claims
judged against the seed-to-seed spread, and a killed comparison that continues where it stopped
and ends with the same table as an uninterrupted one (real processes, SIGKILL).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_helpers import tiny_data

from moe_dist.compare import seeds
from moe_dist.compare.presets import ClaimSpec, split_compare_file
from moe_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def row(variant: str, loss: float, **kw: float | None) -> dict:
    base = dict.fromkeys(seeds.METRICS)
    return base | {"variant": variant, "final_val_loss": loss} | kw


def test_aggregate_and_claims_by_hand() -> None:
    per_seed = {
        1: [row("base", 2.0, ema_gini=0.5, speedup=0.0), row("new", 1.9, ema_gini=0.1, speedup=0.2)],
        2: [row("base", 2.2, ema_gini=0.7, speedup=0.0), row("new", 2.0, ema_gini=0.2, speedup=None)],
    }
    agg = {r["arm"]: r for r in seeds.aggregate(per_seed, ["base", "new"], "base")}
    assert agg["new"]["final_val_loss"]["mean"] == pytest.approx(1.95)
    assert agg["new"]["final_val_loss"]["std"] == pytest.approx(np.std([1.9, 2.0], ddof=1))
    assert agg["new"]["delta_val_loss"]["values"] == pytest.approx([-0.1, -0.2])
    assert agg["base"]["ema_gini"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    claims = [
        ClaimSpec(text="balance", arm="new", metric="ema_gini", better="lower"),
        ClaimSpec(text="loss", arm="new", metric="final_val_loss", better="lower"),
        ClaimSpec(text="faster", arm="new", metric="speedup", better="higher"),
        ClaimSpec(text="worse loss", arm="new", metric="final_val_loss", better="higher"),
        ClaimSpec(text="arm vs arm", arm="base", versus="new", metric="ema_gini", better="higher"),
    ]
    out = {c["text"]: c for c in seeds.judge_claims(per_seed, claims, "base")}
    # Gini: d = [0.4, 0.5], mean 0.45 > spread max(std(.1,.2), std(.5,.7)) = 0.1414 -> holds
    assert out["balance"]["differences"] == pytest.approx([0.4, 0.5])
    assert out["balance"]["spread"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert out["balance"]["verdict"] == "holds"
    # loss: d = [0.1, 0.2], mean 0.15 > spread max(0.0707, 0.1414)? 0.15 > 0.1414 -> holds
    assert out["loss"]["verdict"] == "holds"
    # speedup: seed 2 never reached the baseline's final loss -> -inf: the seeds disagree
    assert out["faster"]["differences"][1] == -math.inf and out["faster"]["verdict"] == "within spread"
    assert out["worse loss"]["verdict"] == "opposite"
    # against another arm than the baseline: base - new = [0.4, 0.5], higher is better -> holds
    assert out["arm vs arm"]["baseline"] == "new" and out["arm vs arm"]["verdict"] == "holds"
    lines = seeds.claim_lines(list(out.values()))
    assert "**holds**" in lines[0] and "never" in lines[2]


def test_compare_section_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"compare": {"arms": {"a": {"router": {"name": "topk_softmax"}}}, "baseline": "b"}})
    )
    with pytest.raises(ConfigError, match=r"compare.baseline: 'b' is not an arm"):
        split_compare_file(str(bad))
    bad.write_text(yaml.safe_dump({"compare": {"seeds": [1], "arms": {"a": {"routr": {}}}}}))
    with pytest.raises(ConfigError, match=r"compare.arms.a.router: Field required"):
        split_compare_file(str(bad))


def test_arm_seeds_and_overrides_and_claims_on_shared_seeds(tmp_path: Path) -> None:
    from moe_dist.compare.plan import CompareOptions, build_configs

    preset = tiny_preset(tmp_path)
    data = yaml.safe_load(preset.read_text())
    data["compare"]["arms"]["long"] = {
        "router": {"name": "topk_softmax"},
        "set": ["schedule.steps=64", "optim.grad_clip=0"],
        "seeds": [6],
    }
    preset.write_text(yaml.safe_dump(data))
    configs = build_configs(CompareOptions(config=str(preset), variants=None, out=tmp_path / "o"))
    assert set(configs) == {"switch_seed5", "none_seed5", "switch_seed6", "none_seed6", "long_seed6"}
    long, none = configs["long_seed6"], configs["none_seed6"]
    assert long["schedule"]["steps"] == 64 and long["optim"]["grad_clip"] == 0
    assert none["schedule"]["steps"] == 16 and none["optim"]["grad_clip"] == 1
    # An arm seed outside compare.seeds, and a bad override, are one message each naming the key.
    data["compare"]["arms"]["long"]["seeds"] = [7]
    preset.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"compare.arms.long.seeds: 7 not in compare.seeds"):
        split_compare_file(str(preset))
    data["compare"]["arms"]["long"] |= {"seeds": [6], "set": ["schedule"]}
    preset.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"arm long: compare.arms.long.set: --set 'schedule': expected"):
        build_configs(CompareOptions(config=str(preset), variants=None, out=tmp_path / "o"))
    # Claims use the seeds both arms run: "long" ran seed 6 only, so seed 5 is not "not measured".
    rows = {
        5: [{"variant": "base", "final_val_loss": 2.0}],
        6: [{"variant": "base", "final_val_loss": 2.0}, {"variant": "long", "final_val_loss": 1.5}],
    }
    rows = {s: [r | {m: r.get(m) for m in seeds.METRICS} for r in rs] for s, rs in rows.items()}
    agg = seeds.aggregate(rows, ["base", "long"], "base")
    claim = ClaimSpec(text="t", arm="long", metric="final_val_loss", better="lower")
    judged = seeds.judge_claims(rows, [claim], "base", {"base": [5, 6], "long": [6]})[0]
    assert judged["seeds"] == [6] and judged["differences"] == [0.5] and judged["verdict"] == "holds"
    assert seeds.judge_claims(rows, [claim], "base")[0]["verdict"] == "not measured"
    assert "per seed (6) +0.5" in seeds.claim_lines([judged])[0]
    # The table prints n/a for a seed the arm did not run, "never" only for a run that never got there.
    assert "| long | 1.5000 ± 0.0000 (n/a / 1.5000) | " in seeds.markdown_table(agg, "base")
    # The spread is over the claim's seeds: "base" varies wildly at seeds 5 and 7, which "long"
    # did not run, and is steady at 6 and 8, which both ran.
    rows = {
        5: [{"variant": "base", "final_val_loss": 9.0}],
        6: [{"variant": "base", "final_val_loss": 2.0}, {"variant": "long", "final_val_loss": 1.5}],
        7: [{"variant": "base", "final_val_loss": 0.5}],
        8: [{"variant": "base", "final_val_loss": 2.1}, {"variant": "long", "final_val_loss": 1.7}],
    }
    rows = {s: [r | {m: r.get(m) for m in seeds.METRICS} for r in rs] for s, rs in rows.items()}
    judged = seeds.judge_claims(rows, [claim], "base", {"base": [5, 6, 7, 8], "long": [6, 8]})[0]
    assert judged["seeds"] == [6, 8] and judged["differences"] == pytest.approx([0.5, 0.4])
    assert judged["spread"] == pytest.approx(max(np.std([2.0, 2.1], ddof=1), np.std([1.5, 1.7], ddof=1)))
    assert judged["verdict"] == "holds"  # over all of base's seeds its std (3.9) would hide it


# ---------------------------------------------------------------- the real command


def tiny_preset(tmp: Path) -> Path:
    data = tiny_data(
        tmp,
        "run.name=c",
        "run.log_every=1000",
        "model.moe.experts.ffn_hidden_size=32",
        "schedule.steps=16",
        "eval.every=4",
        "checkpoint.every=2",
        "checkpoint.keep=1",
    )
    del data["parallel"]["ep_size"]
    data["compare"] = {
        "baseline": "switch",
        "seeds": [5, 6],
        "parallel": 1,
        "pes_tokens": 64,
        "last_n": 4,
        "arms": {
            "switch": {"router": {"name": "topk_softmax"}, "losses": [{"name": "switch", "coef": 0.01}]},
            "none": {"router": {"name": "topk_softmax"}},
        },
        "claims": [{"text": "balancing balances", "arm": "none", "metric": "ema_gini", "better": "higher"}],
    }
    path = tmp / "preset.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def compare_cmd(preset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "moe_dist.cli", "compare", str(preset), "--out", str(out), "--quiet"]


def results(out: Path) -> dict:
    r = json.loads((out / "results.json").read_text())
    for rows in r["rows_per_seed"].values():
        for x in rows:
            x.pop("tokens_per_s")  # wall-clock: the one number a resumed run cannot repeat
            x["final_model"].pop("seconds", None)
    r.pop("status"), r.pop("command")
    return r


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_seed_table_from_logs_and_a_killed_compare_resumes_to_the_same_table(tmp_path: Path) -> None:
    preset = tiny_preset(tmp_path)
    whole = tmp_path / "whole"
    proc = subprocess.run(compare_cmd(preset, whole), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    ref = results(whole)
    # every seed statistic recomputed from the runs' own metrics logs
    for r in ref["seed_rows"]:
        finals = []
        for s in (5, 6):
            recs = records(whole / "runs" / r["arm"] / f"seed{s}" / "metrics.jsonl")
            finals.append([x for x in recs if x.get("val_loss") is not None][-1]["val_loss"])
        assert r["final_val_loss"]["values"] == finals
        assert r["final_val_loss"]["mean"] == pytest.approx(np.mean(finals))
        assert r["final_val_loss"]["std"] == pytest.approx(np.std(finals, ddof=1))
    assert ref["claims"][0]["verdict"] in {"holds", "opposite", "within spread"}
    table = (whole / "results.md").read_text()
    assert "balancing balances" in table and "## Seed 5" in table and "## Seed 6" in table

    # The same comparison, killed (SIGKILL, no clean-up) while its third run is half done.
    cut = tmp_path / "cut"
    victim = cut / "runs" / "switch" / "seed6"
    p = subprocess.Popen(
        compare_cmd(preset, cut), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600

    def half_done() -> bool:
        steps = [int(c.name.split("_")[1]) for c in (victim / "checkpoints").glob("step_*")]
        return any(6 <= s < 16 for s in steps)

    while not half_done():
        assert p.poll() is None and time.monotonic() < deadline, "the compare ended before it could be killed"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (victim / "summary.json").exists()
    time.sleep(1.0)  # the training process got SIGTERM from PR_SET_PDEATHSIG; let it go
    proc = subprocess.run(compare_cmd(preset, cut), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in (victim / "train.log").read_text()
    assert results(cut) == ref
