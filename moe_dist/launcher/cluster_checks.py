"""Checks across fields of a cluster config (backend vs nodes, hosts, restarts, containers), and
of this node's network against it (``this_node_network_errors``, run just before launching).

Each check returns ``path: message`` lines, all of them at once, like ``moe_dist.config``.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any

from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.hostfile import parse_hostfile

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def control_chars(data: Any, path: str = "") -> list[str]:
    """Paths of strings with newlines or other control characters (they would break scripts)."""
    if isinstance(data, dict):
        return [e for k, v in data.items() for e in control_chars(v, f"{path}.{k}" if path else str(k))]
    if isinstance(data, list):
        return [e for i, v in enumerate(data) for e in control_chars(v, f"{path}.{i}")]
    if isinstance(data, str) and _CONTROL.search(data):
        return [f"{path}: must not contain newlines or other control characters"]
    return []


def cross_checks(c: ClusterConfig) -> list[str]:
    errors: list[str] = []
    b = c.backend
    if c.hosts and c.hostfile:
        errors.append("hostfile: give hosts or hostfile, not both")
    if c.hosts and len(c.hosts) != c.nodes:
        errors.append(f"hosts: lists {len(c.hosts)} host(s), but nodes is {c.nodes}")
    if c.hostfile:
        p = c.resolve(c.hostfile)
        if not p.is_file():
            errors.append(f"hostfile: file not found: {p}")
        else:
            try:
                listed = parse_hostfile(p.read_text())
                if len(listed) < c.nodes:
                    errors.append(f"hostfile: {p} lists {len(listed)} host(s), but nodes is {c.nodes}")
                short = [h for h, s in listed[: c.nodes] if s is not None and s < c.procs_per_node]
                if short:
                    errors.append(
                        f"hostfile: {p}: host {short[0]} has fewer slots than procs_per_node "
                        f"({c.procs_per_node})"
                    )
            except ValueError as exc:
                errors.append(f"hostfile: {p}: {exc}")
    if c.node_rank is not None and c.node_rank >= c.nodes:
        errors.append(f"node_rank: must be < nodes ({c.nodes}), got {c.node_rank}")

    if b == "local":
        if c.nodes != 1:
            errors.append(
                f"nodes: backend local runs on this machine only, so nodes must be 1, got {c.nodes}"
            )
        if c.hosts or c.hostfile:
            errors.append(
                "hosts: backend local runs on this machine; use torchrun/mpirun/deepspeed for hosts"
            )
    elif b == "slurm":
        if c.hosts or c.hostfile:
            errors.append("hosts: SLURM allocates the nodes; remove hosts/hostfile (use slurm.directives)")
        if c.rendezvous.endpoint:
            errors.append(
                "rendezvous.endpoint: inside a SLURM job the first allocated node hosts the rendezvous"
            )
    elif c.nodes > 1:
        if b == "torchrun" and not (c.rendezvous.endpoint or c.hosts or c.hostfile):
            errors.append(
                "rendezvous.endpoint: required for torchrun with nodes > 1 "
                "(or list hosts: the first one hosts it)"
            )
        if b in ("mpirun", "deepspeed") and not (c.hosts or c.hostfile):
            errors.append(f"hosts: backend {b} with nodes > 1 needs hosts or a hostfile")
        if b == "deepspeed" and c.deepspeed.no_ssh and c.node_rank is None:
            errors.append(
                "node_rank: deepspeed.no_ssh on several nodes needs this node's rank (or --node-rank)"
            )

    if c.max_restarts and b in ("mpirun", "deepspeed"):
        errors.append(f"max_restarts: backend {b} cannot restart ranks; use torchrun, local or slurm")
    if c.container is not None:
        rt = c.container.runtime
        if b in ("mpirun", "deepspeed"):
            errors.append(
                f"container: backend {b} starts ranks itself; run `moe-dist launch` inside the container"
            )
        elif b == "slurm" and rt == "docker":
            errors.append(
                "container.runtime: SLURM jobs use pyxis (srun --container-image) or apptainer, not docker"
            )
        elif b in ("local", "torchrun") and rt != "docker":
            errors.append(
                f"container.runtime: backend {b} wraps agents in `docker run`; {rt} needs backend slurm"
            )
    if c.slurm.gpus_per_node is not None and b == "slurm" and c.devices == "gpu":
        if c.slurm.gpus_per_node < c.procs_per_node:
            errors.append(
                f"slurm.gpus_per_node: must be >= procs_per_node ({c.procs_per_node}), "
                f"got {c.slurm.gpus_per_node}"
            )
    return errors


RDZV_READ_TIMEOUT_S = 60  # torch's c10d default, when rendezvous.read_timeout_s is not set


def this_node_network_errors(c: ClusterConfig) -> list[str]:
    """What keeps this node from the others, found before anything starts (not for SLURM: its
    nodes are elsewhere): a ``network.socket_ifname`` it lacks (gloo wants exact names; it would
    fail in ``init_process_group`` while the other nodes wait for it), or a rendezvous host that
    does not answer within ``rendezvous.read_timeout_s`` (torchrun would end after that long too,
    but with a traceback)."""
    if c.backend == "slurm":
        return []
    errors = []
    if c.network.socket_ifname:
        have = sorted(name for _, name in socket.if_nameindex())
        missing = [n for n in c.network.socket_ifname.split(",") if n not in have]
        if missing:
            errors.append(
                f"network.socket_ifname: this node ({socket.gethostname()}) has no interface "
                f"{missing[0]!r}; its interfaces: {', '.join(have)}"
            )
    host, port = c.rdzv_host_port()
    if c.nodes > 1 and c.backend in ("torchrun", "deepspeed") and host and port:
        within = c.rendezvous.read_timeout_s or RDZV_READ_TIMEOUT_S
        problem = rendezvous_unreachable(host, port, within)
        if problem:
            where = "rendezvous.endpoint" if c.rendezvous.endpoint else "hosts"
            here = socket.gethostname()
            errors.append(f"{where}: from {here}, the rendezvous host {host}:{port} {problem}")
    return errors


def is_this_node(host: str) -> bool:
    """Does ``host`` name an address of this node (can we bind to it)?"""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], 0))
                return True
            except OSError:
                continue
    return False


def rendezvous_unreachable(host: str, port: int, within_s: float) -> str | None:
    """None when ``host`` answers a TCP connection to ``port`` within ``within_s`` seconds (a
    refusal is an answer: its agent may not listen yet) or is this node; else why not."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"does not resolve ({exc.strerror or exc})"
    if is_this_node(host):
        return None
    deadline = time.monotonic() + within_s
    while True:
        try:
            with socket.create_connection(
                (host, port), timeout=min(3.0, max(0.1, deadline - time.monotonic()))
            ):
                return None
        except ConnectionRefusedError:
            return None
        except OSError as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        if time.monotonic() >= deadline:
            return f"is not reachable within {within_s:g} s (rendezvous.read_timeout_s): {why}"
        time.sleep(0.5)
