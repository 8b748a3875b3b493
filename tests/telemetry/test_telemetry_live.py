"""End to end: a real 2-rank training run (torchrun, EP=2) exports, a real Prometheus scrapes it
through the file_sd file rank 0 writes, and what Prometheus holds equals what the training loop
logged in metrics.jsonl. Every Grafana panel's query must return data from it.

One Prometheus and one training run are shared by the whole module (the run lingers after its
last step so there is something to scrape; the fixture kills it at the end).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_server import ROOT, PrometheusServer, need, values_by
from rank_processes import free_port
from train_helpers import tiny_data

from moe_dist.metrics import load_summary

pytestmark = pytest.mark.slow

STEPS, LAYERS, EXPERTS, EP = 100, 2, 4, 2
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "moe_expert_load.json"


@dataclass
class Live:
    prom: PrometheusServer
    job: str
    records: list[dict[str, Any]]
    sd_file: Path
    proc: subprocess.Popen
    log: Path


def tiny_config(tmp: Path, job: str, sd_dir: Path) -> Path:
    """tests/assets/tiny.yaml with live telemetry, the aux-loss-free bias router and STEPS steps."""
    telemetry = {
        "enabled": True,
        "port_base": free_port(),
        "file_sd_path": f"{sd_dir}/",
        "linger_s": 600,
        "wait_for_scrape_s": 60,  # Prometheus sees the run from its first step
        # not a divisor of STEPS: the last, partial interval must be published at the end
        "interval_steps": 3,
    }
    cfg = tiny_data(
        tmp,
        "run.name=live",
        "run.log_every=10",
        f"run.job_id={job}",
        f"model.n_layers={LAYERS}",
        f"model.moe.num_experts={EXPERTS}",
        "model.moe.router.name=topk_sigmoid_bias",
        "model.moe.experts.ffn_hidden_size=32",
        f"parallel.ep_size={EP}",
        f"schedule.steps={STEPS}",
        "eval.batches=1",
        f"telemetry={json.dumps(telemetry)}",
    )
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("telemetry_live")
    sd_dir = tmp / "sd"
    sd_dir.mkdir()
    job = f"live-{os.getpid()}"
    prom = PrometheusServer(tmp, sd_dir).start()
    log = tmp / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "moe_dist.cli",
                "train",
                str(tiny_config(tmp, job, sd_dir)),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        jsonl = tmp / "runs" / "live" / "metrics.jsonl"
        deadline = time.monotonic() + 150
        records: list[dict[str, Any]] = []
        while len(records) < STEPS:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"training run failed or too slow:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
            if jsonl.exists():
                records = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
        # The exporters publish the last interval when the loop ends; wait until it is scraped.
        prom.wait_for(f'moe_train_step{{job_id="{job}"}} == {STEPS}', lambda r: len(r) == 2, timeout_s=60)
        yield Live(prom, job, records, sd_dir / f"moe-{job}.json", proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        prom.stop()


def test_file_sd_lists_every_rank_and_prometheus_scrapes_them(live: Live) -> None:
    groups = json.loads(live.sd_file.read_text())
    assert [g["labels"]["rank"] for g in groups] == ["0", "1"]
    assert all(g["labels"]["job_id"] == live.job and g["labels"]["node"] for g in groups)
    up = values_by(live.prom.query(f'up{{job_id="{live.job}"}}'), "rank", "instance")
    assert up == {(g["labels"]["rank"], g["targets"][0]): 1.0 for g in groups}


def test_expert_token_totals_equal_the_training_log(live: Live) -> None:
    want = {(str(i), str(e)): 0.0 for i in range(LAYERS) for e in range(EXPERTS)}
    for rec in live.records:
        for i, layer in enumerate(rec["layers"]):
            for e, c in enumerate(layer["counts"]):
                want[str(i), str(e)] += c
    assert sum(want.values()) == STEPS * 2 * 4 * 32 * 2 * LAYERS  # steps x ranks x B x S x top-k x layers
    expr = f'moe_expert_tokens_total{{job_id="{live.job}"}}'
    result = live.prom.wait_for(expr, lambda r: values_by(r, "layer", "expert") == want, timeout_s=20)
    # Each expert is exported exactly once, by the rank that hosts it (expert e on rank e // (E / EP)).
    assert len(result) == LAYERS * EXPERTS
    for r in result:
        assert int(r["metric"]["rank"]) == int(r["metric"]["expert"]) // (EXPERTS // EP)


def test_layer_statistics_and_rank_scalars(live: Live) -> None:
    q = live.prom.query
    job = live.job
    names = {
        "gini": "moe_layer_load_gini",
        "min_max_ratio": "moe_layer_load_min_max_ratio",
        "cv": "moe_layer_load_cv_ratio",
        "normalized_entropy": "moe_layer_load_entropy_ratio",
        "max_violation": "moe_layer_load_max_violation_ratio",
        "dead_experts": "moe_layer_dead_experts",
    }
    got = {key: values_by(q(f'{name}{{job_id="{job}"}}'), "layer") for key, name in names.items()}
    # The gauges describe the last published interval, steps k..STEPS for some k (intervals are
    # every 3 steps but at most one per second): the logged counts of some suffix must give them.
    matches = []
    for k in range(STEPS, 0, -1):
        want = {}
        for i in range(LAYERS):
            counts_E = torch.tensor([r["layers"][i]["counts"] for r in live.records[k - 1 :]]).sum(0)
            for key, value in load_summary(counts_E).items():
                want.setdefault(key, {})[(str(i),)] = value
        if all(got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12) for key in names):
            matches.append(k)
    assert matches, f"no interval ending at step {STEPS} gives the exported statistics {got}"
    routed = values_by(q(f'moe_layer_routed_tokens_total{{job_id="{job}"}}'), "layer")
    assert routed == {(str(i),): STEPS * 2 * 4 * 32 * 2 for i in range(LAYERS)}
    assert values_by(q(f'moe_layer_dropped_tokens_total{{job_id="{job}"}}'), "layer") == {
        (str(i),): 0.0 for i in range(LAYERS)
    }
    aux = values_by(q(f'moe_layer_aux_loss{{job_id="{job}"}}'), "layer", "term")
    assert set(aux) == {(str(i), "switch") for i in range(LAYERS)} and all(v > 0 for v in aux.values())
    spread = values_by(q(f'moe_router_bias_spread{{job_id="{job}"}}'), "layer")
    assert len(spread) == LAYERS and all(v > 0 for v in spread.values())  # the aux-free bias moved
    # per rank: tokens, steps, heartbeat, straggler ratio (mean over ranks is 1 by construction)
    assert values_by(q(f'moe_train_tokens_total{{job_id="{job}"}}'), "rank") == {
        ("0",): STEPS * 4 * 32,
        ("1",): STEPS * 4 * 32,
    }
    ratio = values_by(q(f'moe_rank_received_tokens_ratio{{job_id="{job}"}}'), "rank")
    assert sum(ratio.values()) == pytest.approx(2.0)
    beat = values_by(q(f'moe_last_step_timestamp_seconds{{job_id="{job}"}}'), "rank")
    assert len(beat) == 2 and all(abs(time.time() - t) < 600 for t in beat.values())
    a2a = values_by(q(f'moe_all_to_all_seconds_total{{job_id="{job}"}}'), "rank")
    assert len(a2a) == 2 and all(v > 0 for v in a2a.values())
    info = q(f'moe_job_info{{job_id="{job}"}}')
    assert {(r["metric"]["model"], r["metric"]["router"]) for r in info} == {("live", "topk_sigmoid_bias")}
    assert "exported_job_id" not in info[0]["metric"]


def test_live_endpoints_pass_promtool_check_metrics(live: Live) -> None:
    for group in json.loads(live.sd_file.read_text()):
        body = urllib.request.urlopen(f"http://{group['targets'][0]}/metrics", timeout=10).read()
        assert b"moe_train_step " in body
        check = subprocess.run([need("promtool"), "check", "metrics"], input=body, capture_output=True)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
        assert not (check.stdout + check.stderr).strip(), (
            check.stdout + check.stderr
        ).decode()  # no lint hints


def test_recording_rules_evaluate_on_live_data(live: Live) -> None:
    share = live.prom.wait_for(
        f'job_layer_expert:moe_expert_load:ratio1m{{job_id="{live.job}"}}',
        lambda r: len(r) == LAYERS * EXPERTS,
        timeout_s=30,
    )
    per_layer: dict[str, float] = {}
    for r in share:
        per_layer[r["metric"]["layer"]] = per_layer.get(r["metric"]["layer"], 0.0) + float(r["value"][1])
    assert per_layer == pytest.approx({str(i): 1.0 for i in range(LAYERS)})


def substitute(expr: str, job: str) -> str:
    """Grafana's macros and variables as Grafana would expand them for this job, layer 0."""
    return (
        expr.replace("$__rate_interval", "5m")
        .replace("$job", job)
        .replace('layer=~"$layer"', 'layer=~"0|1"')
        .replace("$layer", "0")
    )


def test_every_dashboard_panel_query_returns_data(live: Live) -> None:
    board = json.loads(DASHBOARD.read_text())
    targets = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 20
    empty = []
    for title, expr in targets:
        assert "$" in expr or "job_id" in expr, title
        result = live.prom.query(substitute(expr, live.job))
        if not result or all(re.fullmatch(r"NaN", r["value"][1]) for r in result):
            empty.append(f"{title}: {substitute(expr, live.job)}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    # the variables' label_values() queries
    jobs = live.prom.api("label/job_id/values", **{"match[]": "moe_job_info"})
    assert live.job in jobs
    layers = live.prom.api("label/layer/values", **{"match[]": f'moe_layer_load_gini{{job_id="{live.job}"}}'})
    assert layers == [str(i) for i in range(LAYERS)]


def _worker_pid(agent_pid: int, rank: int) -> int:
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise LookupError(f"no worker with RANK={rank} under {agent_pid}")


def test_killed_rank_is_down(live: Live) -> None:
    """Last in the module: it ends the shared run."""
    os.kill(_worker_pid(live.proc.pid, 1), signal.SIGKILL)
    live.prom.wait_for(f'up{{job_id="{live.job}", rank="1"}} == 0', lambda r: len(r) == 1, timeout_s=30)
