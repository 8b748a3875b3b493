"""Test-session setup: tests import the package from the checkout and the helpers from tests/helpers/."""

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests" / "helpers")):
    if p not in sys.path:
        sys.path.insert(0, p)


# ------------------------------------------------------------------ nothing left running
# Every process a test starts inherits this mark (tests pass os.environ on). At the end of the
# session a marked process whose parent died (re-parented to PID 1) is a leak: a training run
# that outlived its test's cleanup. It is reported, killed, and the session fails.
SESSION_MARK = "MOE_DIST_TEST_SESSION"
LEAK_GRACE_S = 20.0  # cleanups that sent SIGTERM may still be finishing


def pytest_configure(config: object) -> None:
    os.environ.setdefault(SESSION_MARK, str(os.getpid()))


def _marked_orphans(mark: str) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if ppid != "1" or state == "Z":
                continue
            if f"{SESSION_MARK}={mark}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except (OSError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    mark = os.environ.get(SESSION_MARK)
    if mark != str(os.getpid()):  # a pytest run inside a test: its parent session checks
        return
    deadline = time.monotonic() + LEAK_GRACE_S
    while (left := _marked_orphans(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        lines = "\n".join(f"  {pid}: {cmd}" for pid, cmd in left.items())
        print(f"\nprocesses left running by the tests (killed now):\n{lines}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
