"""One rank's exporter: free when off, clear errors on a busy port, TLS and basic auth, never
blocked by a stuck scraper or a dead Pushgateway, nothing lost when the publisher lags.
Real sockets, a real Pushgateway, real MoE layers; no mocks."""

from __future__ import annotations

import base64
import logging
import math
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_server import need
from rank_processes import free_port

from moe_dist.config import ConfigError, TelemetryConfig, config_from_dict
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.telemetry import Telemetry, start_telemetry
from moe_dist.telemetry.accumulator import StatsAccumulator
from moe_dist.training.step_hook import StepCounts, finish_step

ROOT = Path(__file__).resolve().parents[2]


def layers(n: int = 2, experts: int = 4, dim: int = 16) -> list[MoELayer]:
    cfg = config_from_dict(
        {
            "model": {
                "dim": dim,
                "moe": {
                    "num_experts": experts,
                    "router": {"name": "topk_softmax", "top_k": 2},
                    "losses": [{"name": "switch", "coef": 0.01}],
                },
            }
        }
    )
    torch.manual_seed(0)
    return [MoELayer(cfg.model.moe, dim) for _ in range(n)]


def start(**kw: object) -> Telemetry:
    kw.setdefault("port_base", 0)
    cfg = TelemetryConfig(enabled=True, **kw)
    return start_telemetry(
        cfg, ParallelGroups.single(), job_id="t", model_name="m", router_name="r", local_rank=0, node="n"
    )


def run_steps(tel: Telemetry, ls: list[MoELayer], steps: int, start_step: int = 1) -> list[float]:
    """Real forwards + finish_step + on_step; returns the seconds each on_step took."""
    took = []
    for step in range(start_step, start_step + steps):
        x = torch.randn(8, 16)
        for layer in ls:
            x, _ = layer(x)
        counts = finish_step(ls, ParallelGroups.single())
        t0 = time.perf_counter()
        tel.on_step(step, ls, counts, step_seconds=0.01, tokens=8, losses={"loss": 1.0})
        took.append(time.perf_counter() - t0)
    return took


def scrape(url: str, timeout: float = 5, **kw: object) -> str:
    with urllib.request.urlopen(url, timeout=timeout, **kw) as r:
        return r.read().decode()


def test_disabled_telemetry_costs_nothing() -> None:
    code = (
        "import sys, threading\n"
        "from moe_dist.config import TelemetryConfig\n"
        "from moe_dist.telemetry import start_telemetry\n"
        "t = start_telemetry(TelemetryConfig(), None, job_id='j', model_name='m', router_name='r')\n"
        "assert not t.wants_timing\n"
        "t.on_step(1, [], [], step_seconds=1.0, tokens=1, losses={})\n"
        "t.close({})\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_busy_port_is_a_clear_error_or_a_fallback(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}.*port_fallback"):
            start(port_base=port, port_fallback=False)
        with caplog.at_level(logging.WARNING, logger="moe_dist.telemetry"):
            tel = start(port_base=port, port_fallback=True)
        try:
            assert tel.server.port != port
            assert f"port {port} on 127.0.0.1 is busy" in caplog.text
            assert "moe_job_info" in scrape(tel.url)
        finally:
            tel.close({})


def test_stuck_scrapers_and_a_dead_pushgateway_never_block_training(caplog: pytest.LogCaptureFixture) -> None:
    dead_gateway = f"127.0.0.1:{free_port()}"
    tel = start(pushgateway=dead_gateway, push_timeout_s=2)
    ls = layers()
    silent = socket.create_connection(("127.0.0.1", tel.server.port))  # connects, never sends
    greedy = socket.create_connection(("127.0.0.1", tel.server.port))  # asks, never reads
    greedy.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        took = run_steps(tel, ls, 20)
        # generous for a loaded CI machine; a blocked step would hang or take the push timeout
        assert max(took) < 0.5, f"on_step took up to {max(took):.3f}s"
        t0 = time.perf_counter()
        body = scrape(tel.url)  # a well-behaved scraper is still served
        assert time.perf_counter() - t0 < 2
        assert 'moe_expert_tokens_total{expert="0",layer="0"}' in body
    finally:
        with caplog.at_level(logging.WARNING, logger="moe_dist.telemetry"):
            t0 = time.perf_counter()
            tel.close({"final_loss": 1.0})
            closed_in = time.perf_counter() - t0
        silent.close()
        greedy.close()
    assert closed_in < 5
    assert f"could not push the job summary to the Pushgateway at {dead_gateway}" in caplog.text


def test_summary_is_pushed_to_a_real_pushgateway(tmp_path: Path) -> None:
    port = free_port()
    gw = subprocess.Popen(
        [need("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape(f"http://127.0.0.1:{port}/-/ready", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "pushgateway did not start"
                time.sleep(0.1)
        tel = start(pushgateway=f"127.0.0.1:{port}")
        run_steps(tel, layers(), 3)
        tel.close({"final_loss": 2.5, "steps": 3, "run_dir": "not a number", "skipped": False})
        body = scrape(f"http://127.0.0.1:{port}/metrics")
        want = 'moe_job_summary{field="final_loss",instance="",job="moe_dist",job_id="t",model="m",router="r"'
        assert want + "} 2.5" in body
        assert 'field="steps"' in body and 'field="run_dir"' not in body and 'field="skipped"' not in body
        assert 'moe_job_completion_timestamp_seconds{instance="",job="moe_dist",job_id="t"}' in body
    finally:
        gw.kill()
        gw.wait()


def test_tls_and_basic_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ConfigError, match="basic_auth_password_env"):
        start(basic_auth_user="prom", basic_auth_password_env="MOE_TEST_PW")
    monkeypatch.setenv("MOE_TEST_PW", "s3cret")
    tel = start(
        tls_cert=str(cert), tls_key=str(key), basic_auth_user="prom", basic_auth_password_env="MOE_TEST_PW"
    )
    try:
        assert tel.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(urllib.error.HTTPError, match="401"):
            scrape(tel.url, context=ctx)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP: refused
            scrape(tel.url.replace("https://", "http://"), timeout=2)
        auth = base64.b64encode(b"prom:s3cret").decode()
        req = urllib.request.Request(tel.url, headers={"Authorization": f"Basic {auth}"})
        assert 'moe_job_info{job_id="t",model="m",router="r"} 1.0' in scrape(req, context=ctx)
    finally:
        tel.close({})
        os.environ.pop("MOE_TEST_PW", None)


def test_a_lagging_publisher_loses_nothing() -> None:
    """Both host buffers busy: the interval is folded into the next one, never dropped."""
    acc = StatsAccumulator(interval_steps=1)
    c = torch.tensor([1.0, 2.0, 3.0, 0.0])

    def step() -> None:
        z = torch.zeros(())
        acc.add(StepCounts([c], [c], [z], [c[:2].sum()], 0.1, 0.2), step_seconds=1.0, tokens=4)

    step()
    first = acc.snapshot([], 1, {})
    step()
    second = acc.snapshot([], 2, {})
    step()
    assert acc.snapshot([], 3, {}) is None  # both buffers are being read
    step()
    first.release.release()  # the publisher finished the first one
    third = acc.snapshot([], 4, {})
    assert third is not None and third.steps == 2 and third.tokens == 8
    v = third.views()
    assert v["counts_LE"].tolist() == [[2.0, 4.0, 6.0, 0.0]]
    assert second.views()["counts_LE"].tolist() == [[1.0, 2.0, 3.0, 0.0]]  # untouched by the reuse


def _reference_load_stats(load: list[float]) -> dict[str, float]:
    """One layer's load metrics written out in Python floats (float64), apart from
    ``moe_dist.metrics``: the definitions of its module docstring, with its edge cases."""
    n, total = len(load), math.fsum(load)
    mean, top, low = total / n, max(load), min(load)
    dead = sum(p <= 0 for p in load)
    out = {"gini": 0.0, "cv": 0.0, "normalized_entropy": 1.0}  # an all-zero load or one expert
    if n > 1 and total > 0:
        out["gini"] = math.fsum((2 * i - n - 1) * p for i, p in enumerate(sorted(load), 1)) / (n * total)
        out["cv"] = math.sqrt(math.fsum((p - mean) ** 2 for p in load) / (n - 1)) / mean
        entropy = -math.fsum(p / total * math.log(p / total) for p in load if p > 0)
        out["normalized_entropy"] = entropy / math.log(n)
    out["min_max_ratio"] = low / top if top > 0 else 1.0
    out["max_violation"] = top / mean - 1 if mean > 0 else 0.0
    out["dead_experts"], out["dead_fraction"] = float(dead), dead / n
    return out


@pytest.mark.parametrize("experts", [8, 1])
def test_batched_load_stats_match_a_float64_reference(experts: int) -> None:
    """The exporter's batched form, every layer at once, against the hand-written formulas; the
    per-layer ``load_summary`` (the same code on one layer) agrees too."""
    from moe_dist.metrics import load_stats_L, load_summary

    torch.manual_seed(0)
    E = experts
    counts_LE = torch.cat(
        [
            torch.randint(0, 50, (4, E)).float(),
            torch.zeros(1, E),  # no tokens yet
            torch.full((1, E), 5.0),  # uniform
            torch.tensor([[0.0] * (E - 1) + [9.0]]),  # one expert takes everything
            torch.tensor([[1e6, 0, 3, 0, 0, 0, 0, 0][:E]]),
        ]
    )
    got = load_stats_L(counts_LE)
    assert set(got) == {
        "gini",
        "min_max_ratio",
        "cv",
        "normalized_entropy",
        "max_violation",
        "dead_experts",
        "dead_fraction",
    }
    assert all(v.shape == (counts_LE.shape[0],) and v.dtype == torch.float64 for v in got.values())
    for i, counts_E in enumerate(counts_LE):
        want = _reference_load_stats(counts_E.tolist())
        one = load_summary(counts_E)
        for key, value in want.items():
            assert float(got[key][i]) == pytest.approx(value, rel=1e-12, abs=1e-12), (key, i)
            # the same code on one row: equal up to the order of a reduction's additions
            assert one[key] == pytest.approx(float(got[key][i]), rel=1e-14, abs=1e-15), (key, i)


def test_a_pushgateway_that_never_answers_costs_only_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as mute:  # listens (the kernel completes the handshake), never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        gateway = f"127.0.0.1:{mute.getsockname()[1]}"
        tel = start(pushgateway=gateway, push_timeout_s=1)
        run_steps(tel, layers(), 2)
        with caplog.at_level(logging.WARNING, logger="moe_dist.telemetry"):
            t0 = time.perf_counter()
            tel.close({"final_loss": 1.0})
            took = time.perf_counter() - t0
    assert 0.9 < took < 5
    assert f"could not push the job summary to the Pushgateway at {gateway}" in caplog.text
