"""A launch plan: the argument list to run, the environment it adds, the files it needs.

Every backend turns a ``ClusterConfig`` and the train arguments into one ``LaunchPlan``.
``--dry-run`` prints it (files first, then the command as a copy-pasteable line); a real launch
writes the files and runs the argument list with ``subprocess`` (never through a shell).
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moe_dist.launcher.cluster_config import ClusterConfig

WORKER_MODULE = "moe_dist.cli"


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    files: dict[Path, str] = field(default_factory=dict)  # written before argv runs
    notes: list[str] = field(default_factory=list)  # shown with --dry-run

    def render(self) -> str:
        out = []
        for path, text in self.files.items():
            out += [f"# file: {path}", text.rstrip("\n"), f"# end of file: {path}", ""]
        out += [f"# {n}" for n in self.notes]
        prefix = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        out.append(shlex.join(prefix + self.argv))
        return "\n".join(out) + "\n"


def python_for(cluster: ClusterConfig, in_container: bool = False) -> str:
    """The worker interpreter: configured, else ``python`` in a container, else this one."""
    if cluster.python:
        return cluster.python
    return "python" if in_container else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets_key(args: list[str], key: str) -> bool:
    """Does the user's train command already override ``key`` (``--set key=..``)?"""
    for i, a in enumerate(args):
        value = (
            a[len("--set=") :]
            if a.startswith("--set=")
            else args[i + 1]
            if a == "--set" and i + 1 < len(args)
            else None
        )
        if value is not None and value.split("=", 1)[0].strip() == key:
            return True
    return False


def train_args_for(cluster: ClusterConfig, train_args: list[str]) -> list[str]:
    """The user's ``train CONFIG ...`` plus ``--set telemetry.*`` from the cluster config.

    Values are JSON-quoted because ``--set`` parses them as YAML (a path named ``yes`` must
    stay a string). An override the user wrote themselves wins: we then add none.
    """
    t = cluster.telemetry
    wanted = {
        "telemetry.enabled": None if t.enabled is None else json.dumps(t.enabled),
        "telemetry.port_base": None if t.port_base is None else str(t.port_base),
        "telemetry.file_sd_path": None if t.file_sd_path is None else json.dumps(t.file_sd_path),
    }
    extra = []
    for key, value in wanted.items():
        if value is not None and not _sets_key(train_args, key):
            extra += ["--set", f"{key}={value}"]
    return [*train_args, *extra]


def resume_on_restart(cluster: ClusterConfig, train_args: list[str]) -> tuple[list[str], str | None]:
    """``train ...`` plus ``--resume`` when the launcher restarts workers (``max_restarts > 0``),
    and the note that says so (None when nothing was added).

    A restarted worker group runs the same command again; without ``--resume`` it would refuse
    the checkpoints its first attempt wrote. ``--resume`` alone means "this run's newest
    checkpoint, or a fresh start when there is none", so the first attempt starts fresh. The
    launch still refuses a first start on a run that already has checkpoints when the user did
    not write ``--resume`` (``commands/launch.py`` checks the user's own arguments).
    """
    if not cluster.max_restarts or not train_args or train_args[0] != "train":
        return train_args, None
    if any(a == "--resume" or a.startswith("--resume=") for a in train_args):
        return train_args, None
    note = (
        f"max_restarts is {cluster.max_restarts}: added --resume to the train command, so that a "
        "restarted worker group continues from its newest checkpoint"
    )
    return [*train_args, "--resume"], note


def rdzv_conf(cluster: ClusterConfig) -> str:
    r = cluster.rendezvous
    return f"join_timeout={r.join_timeout_s},last_call_timeout={r.last_call_timeout_s}"
