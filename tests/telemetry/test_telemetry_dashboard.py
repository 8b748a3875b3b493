"""The Grafana side: the dashboard JSON is what tools/make_dashboard.py generates, it type-checks
against npm @grafana/schema (tsc --noEmit --strict, panel options against each panel plugin's
types), and the provisioning and compose files hang together. Its queries are run against a real
Prometheus in tests/telemetry/test_telemetry_live.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "moe_expert_load.json"

SCHEMA = "@grafana/schema/dist/esm/raw/composable"
CHECK_TS = """\
import type {{ Dashboard, Panel }} from "@grafana/schema";
import type {{ Options as TimeSeriesOptions, FieldConfig as TimeSeriesFieldConfig }}
  from "{schema}/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";
import type {{ Options as StatOptions }} from "{schema}/stat/panelcfg/x/StatPanelCfg_types.gen";
import type {{ Options as HeatmapOptions, FieldConfig as HeatmapFieldConfig }}
  from "{schema}/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen";
// Grafana's JSON holds enum VALUES ("list", "absolute"): Json<T> turns each string enum into the
// union of its values and keeps every other check (unknown keys, missing keys, wrong types).
type Json<T> = T extends string ? `${{T}}` : T extends (infer U)[] ? Json<U>[]
  : T extends object ? {{ [K in keyof T]: Json<T[K]> }} : T;
type Typed<O, F> = Json<Panel<O, F> & {{ options: O }}>;
export const dashboard: Json<Dashboard> = {dashboard};
export const timeseries: Array<Typed<TimeSeriesOptions, TimeSeriesFieldConfig>> = {timeseries};
export const stats: Array<Typed<StatOptions, Record<string, unknown>>> = {stats};
export const heatmaps: Array<Typed<HeatmapOptions, HeatmapFieldConfig>> = {heatmaps};
"""


def check_source(board: dict) -> str:
    by_type = {
        t: json.dumps([p for p in board["panels"] if p["type"] == t], indent=1)
        for t in ("timeseries", "stat", "heatmap")
    }
    return CHECK_TS.format(
        schema=SCHEMA,
        dashboard=json.dumps(board, indent=1),
        timeseries=by_type["timeseries"],
        stats=by_type["stat"],
        heatmaps=by_type["heatmap"],
    )


def test_dashboard_is_generated_from_code() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_dashboard.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_dashboard_has_the_panels_users_need() -> None:
    board = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in board["panels"]}
    for want in [
        "Expert load share, layer $layer",
        "Max / mean expert load",
        "Gini coefficient",
        "Dead experts",
        "All-to-all time share",
        "Step time",
        "Tokens/s per rank",
        "Auxiliary losses",
        "Tokens received vs mean",
    ]:
        assert want in titles
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "job", "layer"}
    heat = next(p for p in board["panels"] if p["type"] == "heatmap")
    assert heat["repeat"] == "layer"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.slow
def test_dashboard_type_checks_against_grafana_schema(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    assert npm is not None, (
        "node/npm is required to type-check the Grafana dashboard (apt-get install nodejs npm)"
    )
    for f in ("package.json", "package-lock.json"):
        shutil.copy(GRAFANA / "check" / f, tmp_path / f)
    install = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    board = json.loads(DASHBOARD.read_text())
    (tmp_path / "check.ts").write_text(check_source(board))
    # The same check must reject a broken dashboard: a misspelt panel key and a wrong enum value.
    broken = json.loads(DASHBOARD.read_text())
    ts = next(p for p in broken["panels"] if p["type"] == "timeseries")
    ts["options"]["legend"]["placement"] = "middle"
    ts["maxDataPoint"] = 100  # maxDataPoints
    (tmp_path / "broken.ts").write_text(check_source(broken))
    tsc = [
        str(tmp_path / "node_modules" / ".bin" / "tsc"),
        "--noEmit",
        "--strict",
        "--moduleResolution",
        "bundler",
        "--module",
        "esnext",
        "--target",
        "es2022",
    ]
    out = subprocess.run(
        [*tsc, "check.ts", "broken.ts"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    errors = [line for line in out.stdout.splitlines() if "error TS" in line]
    assert not [e for e in errors if e.startswith("check.ts")], out.stdout
    assert any("broken.ts" in e and '"middle"' in e for e in errors), out.stdout
    assert any("broken.ts" in e and "maxDataPoint" in e for e in errors), out.stdout


def test_provisioning_points_at_the_dashboard_and_datasource() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "moe-prometheus" and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "moe_dist.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    board = json.loads(DASHBOARD.read_text())
    ds_var = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert ds_var["current"]["value"] == "moe-prometheus"


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"trainer", "prometheus", "grafana"}
    trainer = services["trainer"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert (ROOT / "docker" / trainer["build"]["context"]).resolve() == ROOT
    cmd = trainer["command"]
    assert "train" in cmd and "configs/demo.yaml" in cmd and (ROOT / "configs" / "demo.yaml").is_file()
    assert "--set=telemetry.enabled=true" in cmd
    # the config the trainer gets is valid with those overrides
    from moe_dist.config import load_config

    sets = [c.removeprefix("--set=") for c in cmd if c.startswith("--set=")]
    cfg = load_config(ROOT / "configs" / "demo.yaml", sets)
    assert cfg.telemetry.enabled and cfg.telemetry.file_sd_path == "/targets/"
    # every bind-mounted host path exists; the volume the trainer writes targets to is the one
    # Prometheus reads them from, where prometheus.yml looks for them
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src.startswith("."):
                assert (ROOT / "docker" / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in compose["volumes"], f"{name}: unknown volume {src}"
    prom_targets = next(v for v in services["prometheus"]["volumes"] if v.startswith("targets:"))
    prom_cfg = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    files = prom_cfg["scrape_configs"][0]["file_sd_configs"][0]["files"][0]
    assert Path(files).parent == Path(prom_targets.split(":")[1])
    assert any(v.startswith("targets:/targets") for v in trainer["volumes"])
