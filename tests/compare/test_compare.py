"""`moe-dist compare`: the table's numbers come from the logs the runs wrote, runs are deterministic.

The slow tests run the real command (each variant a real `moe-dist train` subprocess) on a tiny
model and recompute every table entry here, from metrics.jsonl and the final checkpoint, with
formulas written out in this file.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_helpers import tiny_data

from moe_dist.compare import report
from moe_dist.compare.arm_logs import RunLogError, read_run_log
from moe_dist.compare.final_model import capacity_drops
from moe_dist.compare.plots import binned_load, plot_all
from moe_dist.compare.variants import VARIANTS, UnknownVariantError, apply_variant, parse_variants

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY, LAST_N = 12, 4, 5


def tiny_base(tmp: Path) -> Path:
    """tests/assets/tiny.yaml as a compare base: no balancing loss and no EP size of its own."""
    data = tiny_data(
        tmp,
        "run.name=c",
        "run.seed=11",
        "run.log_every=1000",
        "model.moe.losses=[]",
        "model.moe.experts.ffn_hidden_size=32",
        f"schedule.steps={STEPS}",
        f"eval.every={EVERY}",
        "checkpoint.keep=1",
    )
    del data["parallel"]["ep_size"]  # each arm's EP size comes from compare's --nproc
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_dist.cli", "compare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


# ---------------------------------------------------------------- independent formulas


def gini_pairs(x: np.ndarray) -> float:
    """Gini as the mean absolute difference over all pairs / (2 * mean)."""
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_row(recs: list[dict], target: float | None, base_tokens: float | None) -> dict:
    steps = [r for r in recs if "layers" in r]
    evals = [r for r in recs if r.get("val_loss") is not None]
    out: dict = {"final_val_loss": evals[-1]["val_loss"], "steps": steps[-1]["step"]}
    out["tokens_per_s"] = float(np.median([r["tokens_per_s"] for r in steps[1:]]))
    n_layers = len(steps[0]["layers"])
    window = [np.sum([r["layers"][li]["counts"] for r in steps[-LAST_N:]], axis=0) for li in range(n_layers)]
    out["gini"] = np.mean([gini_pairs(c) for c in window])
    out["min_max_ratio"] = np.mean([c.min() / c.max() for c in window])
    out["cv"] = np.mean([c.std(ddof=1) / c.mean() for c in window])
    out["max_violation"] = np.mean([c.max() / c.mean() - 1 for c in window])
    ema = [np.zeros(len(window[0])) for _ in range(n_layers)]
    for r in steps:
        for li in range(n_layers):
            ema[li] = 0.99 * ema[li] + 0.01 * np.asarray(r["layers"][li]["counts"])
    out["ema_gini"] = np.mean([gini_pairs(e / e.sum()) for e in ema])
    out["ema_min_max"] = np.mean([e.min() / e.max() for e in ema])
    out["steps_to_baseline"] = out["tokens_to_baseline"] = None
    if target is not None:
        prev = None
        for r in evals:
            if r["val_loss"] <= target:
                if prev is None:
                    out["steps_to_baseline"], out["tokens_to_baseline"] = r["step"], r["tokens"]
                else:
                    frac = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
                    out["steps_to_baseline"] = prev["step"] + frac * (r["step"] - prev["step"])
                    out["tokens_to_baseline"] = prev["tokens"] + frac * (r["tokens"] - prev["tokens"])
                break
            prev = r
    reached = out["tokens_to_baseline"]
    out["speedup"] = None if reached is None else 1 - reached / base_tokens
    return out


@torch.no_grad()
def expected_final_model(run_dir: Path, num_batches: int) -> dict[str, float]:
    """Drops at capacity factor 1.0 and the combine weights' shape, recomputed from the final
    checkpoint by hand (means over layers; the weights' over all tokens)."""
    from moe_dist.config import config_from_dict
    from moe_dist.data.batches import TokenBatches
    from moe_dist.models import build_model
    from moe_dist.parallel.groups import ParallelGroups
    from moe_dist.training import checkpoint, checkpoint_choice

    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    g = ParallelGroups.single()
    model = build_model(cfg.model, g, seed=cfg.run.seed)
    checkpoint.load(checkpoint_choice.choose(run_dir / "checkpoints", g), model, None, g)
    model.eval()
    batches = TokenBatches.for_run(cfg)
    E, K = cfg.model.moe.num_experts, cfg.model.moe.router.top_k
    fractions, sums, shares = [], [], []
    for layer in model.moe_layers():
        seen: list[torch.Tensor] = []
        h = layer.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].flatten(0, -2)))
        for b in range(num_batches):
            model(batches.val_batch(b).x_BS)
        h.remove()
        dropped = routed = 0
        for x_TH in seen:
            routing = layer.gate.router(x_TH)
            ids = routing.experts_TK.reshape(-1)
            counts = torch.bincount(ids, minlength=E)
            cap = math.ceil(x_TH.shape[0] * K / E)
            dropped += int((counts - cap).clamp(min=0).sum())
            routed += ids.numel()
            for w in routing.weights_TK.tolist():
                sums.append(sum(w))
                shares.append(max(w) / sum(w))
        fractions.append(dropped / routed)
    return {
        "drop_fraction": float(np.mean(fractions)),
        "weight_sum": float(np.mean(sums)),
        "top1_share": float(np.mean(shares)),
        "top_k": K,
    }


# ---------------------------------------------------------------- the real command


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("compare")
    base = tiny_base(tmp)
    out = tmp / "out"
    proc = run_compare(
        str(base),
        "--variants",
        "switch,aux_free",
        "--out",
        str(out),
        "--parallel",
        "2",
        "--last-n",
        str(LAST_N),
        "--pes-tokens",
        "64",
        "--quiet",
    )
    return out, proc, base


@pytest.mark.slow
def test_table_numbers_are_recomputed_from_the_logs(
    compared: tuple[Path, subprocess.CompletedProcess, Path],
) -> None:
    out, proc, _ = compared
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["switch", "aux_free"]
    base_recs = records(out / "runs" / "switch" / "metrics.jsonl")
    target = [r for r in base_recs if r.get("val_loss") is not None][-1]["val_loss"]
    base_tokens = [r for r in base_recs if "layers" in r][-1]["tokens"]
    table = (out / "results.md").read_text()
    for name, row in rows.items():
        recs = records(out / "runs" / name / "metrics.jsonl")
        exp = expected_row(recs, target, base_tokens)
        assert row["steps"] == exp["steps"] == STEPS
        for key in (
            "final_val_loss",
            "tokens_per_s",
            "gini",
            "min_max_ratio",
            "cv",
            "max_violation",
            "ema_gini",
            "ema_min_max",
        ):
            assert row[key] == pytest.approx(exp[key], rel=1e-9, abs=1e-12), (name, key)
        for key in ("steps_to_baseline", "tokens_to_baseline", "speedup"):
            if exp[key] is None:
                assert row[key] is None, (name, key)
            else:
                assert row[key] == pytest.approx(exp[key], rel=1e-9), (name, key)
        final = expected_final_model(out / "runs" / name, 2)
        assert row["drop_fraction"] == pytest.approx(final["drop_fraction"], abs=1e-12)
        for key in ("weight_sum", "top1_share"):
            assert row["final_model"][key] == pytest.approx(final[key], rel=1e-5), (name, key)
        assert 1 / final["top_k"] <= row["final_model"]["top1_share"] <= 1.0
        assert 0.0 <= row["drop_fraction"] < 1.0
        assert -1.0 <= row["pes_min"] <= 1.0 and row["pes_min"] == min(row["final_model"]["pes_per_layer"])
        # the Markdown line shows those same numbers
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{exp['final_val_loss']:.4f}"
        assert cells[5] == f"{exp['gini']:.3f}" and cells[6] == f"{exp['min_max_ratio']:.3f}"
        assert cells[8] == f"{exp['max_violation']:.3f}" and cells[9] == f"{exp['ema_gini']:.3f}"
        assert cells[12] == f"{row['pes_min']:.4f}"
        if exp["steps_to_baseline"] is None:
            assert cells[3] == "not reached"
        else:
            assert cells[3].startswith(f"{exp['steps_to_baseline']:.0f} (")
    # the baseline reaches its own final loss at its last evaluation at the latest
    assert rows["switch"]["steps_to_baseline"] <= STEPS
    for png in ["val_loss.png", "gini.png", "load_switch.png", "load_aux_free.png"]:
        assert (out / png).stat().st_size > 1000
    # the exact config of each run is kept, and differs only in the router and losses
    cfgs = {n: yaml.safe_load((out / "configs" / f"{n}.yaml").read_text()) for n in rows}
    assert cfgs["aux_free"]["model"]["moe"]["router"]["name"] == "topk_sigmoid_bias"
    assert cfgs["switch"]["model"]["moe"]["losses"][0]["name"] == "switch"
    for c in cfgs.values():
        c["model"]["moe"].pop("router"), c["model"]["moe"].pop("losses"), c["run"].pop("name")
    assert cfgs["switch"] == cfgs["aux_free"]


@pytest.mark.slow
def test_same_variant_twice_gives_identical_losses(
    compared: tuple[Path, subprocess.CompletedProcess, Path], tmp_path: Path
) -> None:
    out, proc, base = compared
    assert proc.returncode == 0, proc.stderr
    # in this process this time (the training itself is a subprocess either way)
    from moe_dist.cli import main

    again = tmp_path / "again"
    assert main(["compare", str(base), "--variants", "switch", "--out", str(again), "--quiet"]) == 0
    a = records(out / "runs" / "switch" / "metrics.jsonl")
    b = records(tmp_path / "again" / "runs" / "switch" / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert [r["layers"] for r in a] == [r["layers"] for r in b]
    # and a different variant really trains differently
    c = records(out / "runs" / "aux_free" / "metrics.jsonl")
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_bad_input_is_one_message_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moe_dist.cli import main

    base = tiny_base(tmp_path)
    out = str(tmp_path / "o")
    assert main(["compare", str(base), "--variants", "switch,nope", "--out", out]) == 2
    assert "unknown variant(s) nope" in capsys.readouterr().err
    assert main(["compare", str(base), "--set", "model.moe.router.top_k=9", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("top_k: must be <= num_experts (4), got 9") == 1 and "Traceback" not in err
    assert main(["compare", str(tmp_path / "missing.yaml"), "--out", out]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing trained


# ---------------------------------------------------------------- pieces, on hand-made data


def test_iso_loss_interpolates_between_evaluations() -> None:
    steps, tokens = np.array([10, 20, 30]), np.array([100.0, 200.0, 300.0])
    loss = np.array([3.0, 2.0, 1.0])
    assert report.iso_loss_point(steps, tokens, loss, 1.5) == (25.0, 250.0)
    assert report.iso_loss_point(steps, tokens, loss, 3.5) == (10.0, 100.0)
    assert report.iso_loss_point(steps, tokens, loss, 0.5) is None
    # a noisy curve counts its first crossing
    assert report.iso_loss_point(steps, tokens, np.array([3.0, 1.0, 2.0]), 2.0) == (15.0, 150.0)


def test_capacity_drops_worked_example() -> None:
    # 4 experts, 16 slots: capacity ceil(16 / 4) = 4; expert 0 has 7 -> 3 dropped, expert 2 has 5 -> 1
    assert capacity_drops(torch.tensor([7.0, 2.0, 5.0, 2.0]), 1.0) == (4.0, 16.0)
    assert capacity_drops(torch.tensor([7.0, 2.0, 5.0, 2.0]), 2.0) == (0.0, 16.0)


def test_variants_change_only_router_and_losses() -> None:
    base = {
        "model": {
            "dim": 64,
            "moe": {
                "num_experts": 8,
                "router": {"name": "topk_softmax", "top_k": 3},
                "losses": [{"name": "switch", "coef": 0.5}],
            },
        },
        "optim": {"lr": 1.0},
    }
    simbal = apply_variant(base, "simbal")
    assert simbal["model"]["moe"]["router"] == {"name": "topk_softmax", "init": "orthogonal", "top_k": 3}
    assert [x["name"] for x in simbal["model"]["moe"]["losses"]] == ["simbal", "z_loss"]
    assert apply_variant(base, "expert_choice")["model"]["moe"]["router"]["capacity_factor"] == 3.0
    assert apply_variant(base, "lpr")["model"]["moe"]["losses"] == []
    assert base["model"]["moe"]["losses"] == [{"name": "switch", "coef": 0.5}]  # not mutated
    from moe_dist.config import config_from_dict

    for name in VARIANTS:  # every variant is a valid config
        config_from_dict(apply_variant(base, name))
    assert parse_variants(" switch, lpr ") == ["switch", "lpr"]
    with pytest.raises(UnknownVariantError, match="given more than once"):
        parse_variants("lpr,lpr")


def _write_log(path: Path, counts_per_step: list[list[list[float]]], evals: dict[int, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i, layers in enumerate(counts_per_step, 1):
            per_layer = [{"layer": li, "counts": c} for li, c in enumerate(layers)]
            rec = {
                "step": i,
                "loss": 3.0 - 0.1 * i,
                "aux": {},
                "lr": 1e-3,
                "tokens": 100 * i,
                "tokens_per_s": 1000.0 + i,
                "layers": per_layer,
            }
            if i in evals:
                rec["val_loss"] = evals[i]
            fh.write(json.dumps(rec) + "\n")


def test_report_and_plots_from_handmade_logs(tmp_path: Path) -> None:
    balanced = [[[5.0, 5.0, 5.0, 5.0]] * 2] * 10
    skewed = [[[20.0, 0.0, 0.0, 0.0], [10.0, 10.0, 0.0, 0.0]]] * 10
    _write_log(tmp_path / "a" / "metrics.jsonl", balanced, {5: 2.0, 10: 1.0})
    _write_log(tmp_path / "b" / "metrics.jsonl", skewed, {5: 2.5, 10: 1.5})
    logs = {n: read_run_log(tmp_path / n / "metrics.jsonl") for n in "ab"}
    assert logs["b"].counts_LNE.shape == (2, 10, 4)
    rows = report.summarize(logs, {}, baseline="a", last_n=3)
    a, b = rows
    assert a["gini"] == 0.0 and a["min_max_ratio"] == 1.0 and a["speedup"] == pytest.approx(0.0)
    assert b["gini"] == pytest.approx((0.75 + 0.5) / 2) and b["min_max_ratio"] == 0.0
    assert b["max_violation"] == pytest.approx((3.0 + 1.0) / 2)
    assert b["steps_to_baseline"] is None and b["drop_fraction"] is None
    table = report.markdown_table(rows, "a")
    assert "| b | 1.5000 | +0.5000 | not reached |" in table and "n/a" in table
    paths = plot_all({None: logs}, "a", tmp_path / "plots")
    assert {p.name for p in paths} == {
        "val_loss.png",
        "gini.png",
        "gini_layers.png",
        "load_a.png",
        "load_b.png",
    }
    assert all(p.stat().st_size > 1000 for p in paths)
    edges, norm_EW = binned_load(np.array(skewed)[:, 1, :], max_bins=4)
    assert list(edges) == [0, 2, 5, 7, 10] and np.allclose(norm_EW[:, 0], [2.0, 2.0, 0.0, 0.0])


def test_unreadable_log_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 1, "tokens": 1, "layers": []}\nnot json\n')
    with pytest.raises(RunLogError, match=r"metrics.jsonl:2"):
        read_run_log(p)


@pytest.mark.parametrize("config", ["configs/compare.yaml", "configs/compare_gpu.yaml"])
def test_shipped_configs_are_valid_for_every_variant(config: str) -> None:
    from moe_dist.compare.plan import CompareOptions, build_configs

    opts = CompareOptions(config=str(ROOT / config), variants=list(VARIANTS), out=Path("/nonexistent/out"))
    configs = build_configs(opts)
    assert set(configs) == set(VARIANTS)
    assert {c["run"]["out_dir"] for c in configs.values()} == {"/nonexistent/out/runs"}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "configs" / "compare").glob("*.yaml")))
def test_shipped_presets_are_valid_for_every_arm_and_seed(preset: str) -> None:
    from moe_dist.compare.plan import CompareOptions, build_configs
    from moe_dist.compare.presets import preset_path, split_compare_file

    path = preset_path(preset, ROOT)
    _, section = split_compare_file(str(path))
    configs = build_configs(CompareOptions(config=str(path), variants=None, out=Path("/nonexistent/o")))
    arms = section.arms
    assert set(configs) == {f"{a}_seed{s}" for a in arms for s in (arms[a].seeds or section.seeds)}
    assert section.baseline in arms and len(section.seeds) >= 3 and section.claims
    for key, cfg in configs.items():
        arm = arms[key.rsplit("_seed", 1)[0]]
        assert cfg["run"]["seed"] == int(key.rsplit("seed", 1)[1])
        assert cfg["run"]["out_dir"].startswith("/nonexistent/o/runs/")
        assert cfg["data"]["tokenizer"]["kind"] == "hf"
        assert cfg["model"]["moe"]["router"]["name"] == arm.router["name"]
        for item in arm.set:  # each arm's own overrides reach its config
            k, v = item.split("=", 1)
            node = cfg
            for part in k.split("."):
                node = node[part]
            assert node == yaml.safe_load(v), (key, item)


@pytest.mark.slow
def test_rerun_keeps_finished_runs_and_rebuilds_the_same_table(
    compared: tuple[Path, subprocess.CompletedProcess, Path],
) -> None:
    from moe_dist.cli import main

    out, proc, base = compared
    assert proc.returncode == 0, proc.stderr
    log = out / "runs" / "switch" / "metrics.jsonl"
    mtime, rows = log.stat().st_mtime_ns, json.loads((out / "results.json").read_text())["rows"]
    args = ["compare", str(base), "--variants", "switch,aux_free", "--out", str(out)]
    assert main([*args, "--last-n", str(LAST_N), "--pes-tokens", "64", "--quiet"]) == 0
    assert log.stat().st_mtime_ns == mtime  # not trained again
    again = json.loads((out / "results.json").read_text())["rows"]
    keys = ["final_val_loss", "gini", "ema_gini", "steps_to_baseline", "drop_fraction", "pes_min"]
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]


@pytest.mark.slow
def test_report_only_tabulates_finished_runs_and_touches_nothing_else(
    compared: tuple[Path, subprocess.CompletedProcess, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_dist.cli import main

    out, proc, base = compared
    assert proc.returncode == 0, proc.stderr
    logs = {arm: out / "runs" / arm / "metrics.jsonl" for arm in ("switch", "aux_free")}
    mtimes = {arm: log.stat().st_mtime_ns for arm, log in logs.items()}
    args = ["compare", str(base), "--out", str(out), "--last-n", str(LAST_N), "--pes-tokens", "64"]
    args += ["--quiet", "--report-only"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    (out / "results.json").unlink()
    assert main([*args, "--variants", "switch,aux_free"]) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    # an arm never run, and a changed config (which a normal run would retrain from scratch)
    assert main([*args, "--variants", "switch,seq_aux"]) == 2
    assert main([*args, "--variants", "switch,aux_free", "--steps", str(STEPS + 1)]) == 2
    err = capsys.readouterr().err
    assert "seq_aux (missing, or trained with a different config)" in err and "Traceback" not in err
    assert "aux_free (missing, or trained with a different config)" in err
    assert not (out / "runs" / "seq_aux").exists()
    assert {arm: log.stat().st_mtime_ns for arm, log in logs.items()} == mtimes  # nothing retrained
    assert main(["compare", str(base), "--out", str(out), "--fresh", "--report-only"]) == 2


@pytest.mark.slow
def test_nproc_runs_each_variant_with_expert_parallelism(tmp_path: Path) -> None:
    from moe_dist.cli import main

    base, out = tiny_base(tmp_path), tmp_path / "ep2"
    args = [
        "compare",
        str(base),
        "--variants",
        "global_batch",
        "--nproc",
        "2",
        "--steps",
        "4",
        "--out",
        str(out),
    ]
    assert main([*args, "--pes-tokens", "32", "--quiet"]) == 0
    summary = json.loads((out / "runs" / "global_batch" / "summary.json").read_text())
    assert (summary["world_size"], summary["ep_size"]) == (2, 2)
    row = json.loads((out / "results.json").read_text())["rows"][0]
    recs = records(out / "runs" / "global_batch" / "metrics.jsonl")
    assert row["tokens"] == recs[-1]["tokens"] == 4 * 2 * 4 * 32  # steps x ranks x batch x seq
    assert row["final_val_loss"] == [r for r in recs if "val_loss" in r][-1]["val_loss"]
