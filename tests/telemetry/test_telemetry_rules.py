"""The shipped Prometheus config and rules pass promtool, and the alert rules do what they say
(promtool unit tests in docker/prometheus/tests/: dead expert, imbalance, straggler by load and by
compute, and a killed rank: its target down and the surviving rank's job stalled)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from prometheus_server import PROM_DIR, need


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([need("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_config_and_rules_are_valid() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    rules = sorted(str(p) for p in (PROM_DIR / "rules").glob("*.yml"))
    assert len(rules) == 2
    out = promtool("check", "rules", *rules)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout and "SUCCESS: 7 rules found" in out.stdout


def test_alert_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", "tests/moe_alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rule_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests have teeth: a stall threshold of 10 minutes instead of 2 fails them."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROM_DIR, copy)
    alerts = copy / "rules" / "moe_alerts.yml"
    text = alerts.read_text()
    assert "time() - moe_last_step_timestamp_seconds > 120" in text
    alerts.write_text(
        text.replace(
            "time() - moe_last_step_timestamp_seconds > 120", "time() - moe_last_step_timestamp_seconds > 600"
        )
    )
    out = promtool("test", "rules", "tests/moe_alerts_test.yml", cwd=copy)
    assert out.returncode != 0
    assert "MoEJobStalled" in out.stdout + out.stderr
