"""A real Prometheus for tests: the shipped docker/prometheus config, fast intervals, a temp TSDB.

``PrometheusServer(workdir, sd_dir)`` rewrites ``docker/prometheus/prometheus.yml`` for the test
(1 s scrape and rule evaluation, file_sd from ``sd_dir``, absolute rule paths), starts
``prometheus`` on a free port and waits until it is ready; ``query`` runs an instant query,
``wait_for`` polls one until a predicate holds (never a fixed sleep), ``stop`` kills it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rank_processes import free_port

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "docker" / "prometheus"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed: run `make setup-system` (Debian package prometheus)")
    return path


class PrometheusServer:
    def __init__(self, workdir: Path, sd_dir: Path) -> None:
        self.workdir, self.sd_dir = workdir, sd_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict[str, Any]:
        cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
        for job in cfg["scrape_configs"]:
            for sd in job.get("file_sd_configs", []):
                sd["files"] = [str(self.sd_dir / "*.json")]
                sd["refresh_interval"] = "1s"
        return cfg

    def start(self, timeout_s: float = 60) -> PrometheusServer:
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config()))
        self.log = open(self.workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                need("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a PromQL error raises with Prometheus' message."""
        try:
            return self.api("query", query=expr)["result"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"query {expr!r} failed: {exc.read().decode()}") from None

    def wait_for(self, expr: str, ok: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 60) -> list:
        deadline = time.monotonic() + timeout_s
        result: list = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr!r}: condition not met in {timeout_s}s; last result {result}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()


def values_by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    """``{(label values...): value}`` of an instant-query result."""
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in result}
