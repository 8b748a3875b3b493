"""Telemetry across two real hosts: each rank's exporter binds its host's own address, rank 0's
file_sd targets name both hosts, and a real Prometheus (running in host 0) scrapes both.

One torchrun launch per host, EP=2 with one process per host, each with ``--set
telemetry.bind=<its address>``. Prometheus must see both targets up, labelled with their
node, and every rank's expert series: each expert once, from the rank (and so the host) that
holds it, with the token totals of rank 0's training log. The losses equal the one-host run.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import launch_cmd, logged_losses
from multihost_launch import (
    assert_same_losses,
    cross_host_cluster,
    last_step,
    one_host_losses,
    step_seconds,
    tails,
    train_cmd,
    wait_until,
)
from prometheus_server import PrometheusServer, need, values_by
from two_hosts import TwoHosts, no_leftovers, two_hosts  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]
PORT, PROM_PORT, LAYERS, EXPERTS, EP = 9400, 9090, 2, 4, 2


class PrometheusInHost(PrometheusServer):
    """``PrometheusServer`` run inside a test host; its API is queried from inside that host."""

    def __init__(self, hosts: TwoHosts, host: int, workdir: Path, sd_dir: Path) -> None:
        super().__init__(workdir, sd_dir)
        self.hosts, self.host = hosts, host
        self.port, self.url = PROM_PORT, f"http://127.0.0.1:{PROM_PORT}"

    def start(self, timeout_s: float = 60) -> PrometheusInHost:
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config()))
        argv = [
            need("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc = self.hosts.popen(self.host, argv, self.workdir / "prometheus.log")
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        def probe() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    return r.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        return self.hosts.call_in(self.host, probe)

    def api(self, path: str, **params: str) -> Any:
        return self.hosts.call_in(self.host, lambda: PrometheusServer.api(self, path, **params))


def test_prometheus_scrapes_every_rank_on_both_hosts(
    two_hosts: TwoHosts,  # noqa: F811
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    sd = tmp_path / "sd"
    sd.mkdir()
    (tmp_path / "prom").mkdir()
    prom = PrometheusInHost(two_hosts, 0, tmp_path / "prom", sd).start()
    job = f"multihost-{os.getpid()}"
    telemetry = {"enabled": True, "port_base": PORT, "file_sd_path": f"{sd}/"}
    cluster = cross_host_cluster(tmp_path, "telemetry", two_hosts, "torchrun", 1, telemetry=telemetry)
    logs, procs = [], []
    for h in two_hosts.hosts:
        more = ["--set", f"telemetry.bind={h.addr}", "--set", f"run.job_id={job}"]
        # keep the exporters up after the last step until Prometheus has it; seen from the start
        more += ["--set", "telemetry.linger_s=120", "--set", "telemetry.wait_for_scrape_s=60"]
        train = train_cmd(tmp_path, tmp_path / "runs", *more)
        logs.append(tmp_path / f"host{h.index}.log")
        procs.append(
            two_hosts.popen(
                h.index, launch_cmd(cluster, train, f"--node-rank={h.index}"), logs[-1], cwd=tmp_path
            )
        )
    try:
        # rank 0's targets: one per rank, each at its own host's address
        sd_file = sd / f"moe-{job}.json"
        wait_until(sd_file.exists, "file_sd targets", 180, procs, logs)
        groups = json.loads(sd_file.read_text())
        assert [(g["targets"], g["labels"]["node"], g["labels"]["rank"]) for g in groups] == [
            ([f"{h.addr}:{PORT}"], h.hostname, str(h.index)) for h in two_hosts.hosts
        ]
        runs = tmp_path / "runs" / "tiny"
        wait_until(lambda: last_step(runs) >= 20, "the last step", 180, procs, logs)
        up = prom.wait_for(f'up{{job_id="{job}"}}', lambda r: len(r) == 2, timeout_s=30)
        assert values_by(up, "instance", "node", "rank") == {
            (f"{h.addr}:{PORT}", h.hostname, str(h.index)): 1.0 for h in two_hosts.hosts
        }
        # every rank's expert series, with the token totals the training log counted
        want = {(str(i), str(e)): 0.0 for i in range(LAYERS) for e in range(EXPERTS)}
        for line in (runs / "metrics.jsonl").read_text().splitlines():
            for i, layer in enumerate(json.loads(line).get("layers", [])):
                for e, c in enumerate(layer["counts"]):
                    want[str(i), str(e)] += c
        expr = f'moe_expert_tokens_total{{job_id="{job}"}}'
        got = prom.wait_for(expr, lambda r: values_by(r, "layer", "expert") == want, timeout_s=60)
        hosts_of = {str(h.index): (h.hostname, f"{h.addr}:{PORT}") for h in two_hosts.hosts}
        for r in got:  # expert e lives on EP rank e // (E / EP), here one rank per host
            rank = r["metric"]["rank"]
            assert int(rank) == int(r["metric"]["expert"]) // (EXPERTS // EP)
            assert (r["metric"]["node"], r["metric"]["instance"]) == hosts_of[rank]
        assert {r["metric"]["rank"] for r in got} == {"0", "1"} and len(got) == LAYERS * EXPERTS
    finally:
        for h in two_hosts.hosts:  # the lingering exporters: end both launches
            two_hosts.kill_host(h.index)
        prom.stop()
    out = "".join(log.read_text() for log in logs)
    assert "world 2 = DP 1 x EP 2" in out, tails(logs)
    assert_same_losses(logged_losses(runs), one_host_losses(tmp_path_factory, 2))
    print(f"veth link: {step_seconds(runs):.3f} s per step")
