"""Prometheus ``file_sd`` targets for every rank's exporter, written by rank 0.

Each rank's actual address is gathered (a fallback port differs from ``port_base + local rank``),
then rank 0 writes one target group per rank, labelled with job id, node and rank, atomically
(temp file + rename in the same directory) so Prometheus never reads half a file. Example::

    [{"targets": ["node3:9401"],
      "labels": {"job_id": "demo-1", "node": "node3", "rank": "1", "local_rank": "1", "__scheme__": "http"}}]

``path`` may name a directory (existing, or ending in ``/``): the file is then
``<dir>/moe-<job_id>.json``, so several jobs share one ``file_sd_configs`` glob.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist


@dataclass
class Endpoint:
    rank: int
    local_rank: int
    node: str
    host: str
    port: int
    scheme: str


def gather_endpoints(mine: Endpoint) -> list[Endpoint]:
    """Every rank's endpoint, ordered by rank (a collective when distributed: all ranks call it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, asdict(mine))
    return [Endpoint(**e) for e in out if e is not None]


def _ranges(values: list[int]) -> str:
    """[9400, 9401, 9402, 9410] -> "9400-9402,9410"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def serving_line(endpoints: list[Endpoint], list_up_to: int = 8) -> str:
    """Where every rank serves its metrics, one console line with the real bound ports
    (``port_base: 0`` or a busy port's fallback picks them at start). Up to ``list_up_to`` ranks
    every URL is listed; beyond, one entry per host::

        telemetry: rank 0 http://node1:9400/metrics, rank 1 http://node1:9401/metrics
        telemetry: 16 ranks, /metrics on http://node1 ports 9400-9407 (ranks 0-7), http://node2 ...
    """
    if len(endpoints) <= list_up_to:
        return "telemetry: " + ", ".join(
            f"rank {e.rank} {e.scheme}://{e.host}:{e.port}/metrics" for e in endpoints
        )
    by_host: dict[tuple[str, str], list[Endpoint]] = {}
    for e in endpoints:
        by_host.setdefault((e.scheme, e.host), []).append(e)
    hosts = [
        f"{scheme}://{host} ports {_ranges([e.port for e in g])} (ranks {_ranges([e.rank for e in g])})"
        for (scheme, host), g in by_host.items()
    ]
    return f"telemetry: {len(endpoints)} ranks, /metrics on " + ", ".join(hosts)


def targets_path(path: str, job_id: str) -> Path:
    p = Path(path)
    if path.endswith("/") or p.is_dir():
        return p / f"moe-{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}.json"
    return p


def target_groups(endpoints: list[Endpoint], job_id: str) -> list[dict]:
    return [
        {
            "targets": [f"{e.host}:{e.port}"],
            "labels": {
                "job_id": job_id,
                "node": e.node,
                "rank": str(e.rank),
                "local_rank": str(e.local_rank),
                "__scheme__": e.scheme,
            },
        }
        for e in endpoints
    ]


def write_targets(path: Path, groups: list[dict]) -> None:
    """Atomically replace ``path`` with ``groups`` as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=1)
        os.chmod(tmp, 0o644)  # readable by a Prometheus running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
