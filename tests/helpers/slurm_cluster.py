"""A real single-node SLURM cluster in a temp dir, for the launcher tests.

``with slurm_cluster(tmp) as env:`` starts ``munged`` (own key and socket), ``slurmctld`` and
``slurmd`` (Debian packages slurmctld, slurmd, munge) from a ``slurm.conf`` under ``tmp`` and
yields the environment (``SLURM_CONF``) that ``sbatch``/``squeue`` need; it stops the daemons
(by their pids) on exit. Missing packages raise ``RuntimeError`` with what to install: a test
that needs SLURM fails, it does not skip.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

PROGRAMS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(d: Path, node: str, cpus: int, user: str) -> str:
    return f"""ClusterName=moetest
SlurmctldHost={node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def slurm_cluster(tmp: Path, start_timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    missing = sorted({pkg for prog, pkg in PROGRAMS.items() if shutil.which(prog) is None})
    if missing:
        raise RuntimeError(
            f"SLURM test needs the Debian packages {' '.join(missing)} (run `make setup-system` as root)"
        )
    d = tmp / "slurm"
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(_conf(d, node, os.cpu_count() or 1, getpass.getuser()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pidfiles = [d / "slurmd.pid", d / "slurmctld.pid", d / "munged.pid"]
    try:
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={d}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={d}/munged.pid",
                f"--log-file={d}/munged.log",
                f"--seed-file={d}/munged.seed",
            ],
            check=True,
            capture_output=True,
            timeout=15,
        )
        subprocess.run(["slurmctld", "-i"], env=env, check=True, capture_output=True, timeout=15)
        subprocess.run(["slurmd"], env=env, check=True, capture_output=True, timeout=15)
        deadline = time.monotonic() + start_timeout_s
        while True:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0 and out.stdout.strip().rstrip("*") in ("idle", "mixed"):
                break
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in d.glob("*.log"))
                raise RuntimeError(
                    f"single-node SLURM did not come up in {start_timeout_s:.0f} s: "
                    f"sinfo says {out.stdout.strip() or out.stderr.strip()}\n{logs}"
                )
            time.sleep(0.3)
        yield {"SLURM_CONF": str(conf)}
    finally:
        for pidfile in pidfiles:
            pid = _pid(pidfile)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        for pidfile in pidfiles:
            pid = _pid(pidfile)
            deadline = time.monotonic() + 10
            while pid is not None and time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
