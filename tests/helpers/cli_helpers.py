"""Running the real CLI the way a user does, for the tests that check its output and exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float | None = 120) -> subprocess.CompletedProcess[str]:
    """``python -m moe_dist.cli ARGS`` from the repository root, stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "moe_dist.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
