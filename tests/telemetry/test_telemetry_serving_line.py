"""Where each rank serves its metrics (issue 28): with ``port_base: 0`` every rank binds a port
the OS picks; rank 0's ``serving()`` line names every rank's real URL, and each one answers."""

from __future__ import annotations

import re
import urllib.request

import pytest
from rank_processes import run_on_ranks

from moe_dist.telemetry.file_sd import Endpoint, serving_line


def _rank_body(rank: int, world_size: int) -> dict:
    from moe_dist.config import config_from_dict
    from moe_dist.parallel.groups import ParallelGroups
    from moe_dist.telemetry import start_telemetry

    cfg = config_from_dict({"parallel": {"ep_size": 1}, "telemetry": {"enabled": True, "port_base": 0}})
    groups = ParallelGroups.build(1)
    tel = start_telemetry(cfg.telemetry, groups, job_id="j", model_name="m", router_name="r", local_rank=rank)
    line = tel.serving()
    answered = []
    if rank == 0:
        for url in re.findall(r"http://\S+/metrics", line):
            with urllib.request.urlopen(url, timeout=10) as resp:
                answered.append(b"moe_job_info" in resp.read())
    import torch.distributed as dist

    dist.barrier()  # rank 1 serves until rank 0 has asked
    port = tel.server.port
    tel.close({})
    return {"line": line, "port": port, "answered": answered}


@pytest.mark.slow
def test_every_rank_real_port_is_printed_with_port_base_0() -> None:
    out = run_on_ranks(_rank_body, 2)
    ports = [o["port"] for o in out]
    assert all(p > 0 for p in ports) and len(set(ports)) == 2
    want = (
        f"telemetry: rank 0 http://127.0.0.1:{ports[0]}/metrics, rank 1 http://127.0.0.1:{ports[1]}/metrics"
    )
    assert out[0]["line"] == want
    assert out[0]["answered"] == [True, True]


def test_many_ranks_are_summarised_per_host() -> None:
    eps = [Endpoint(r, r % 4, f"n{r // 4}", f"n{r // 4}", 9400 + r % 4, "https") for r in range(12)]
    assert serving_line(eps, list_up_to=8) == (
        "telemetry: 12 ranks, /metrics on https://n0 ports 9400-9403 (ranks 0-3), "
        "https://n1 ports 9400-9403 (ranks 4-7), https://n2 ports 9400-9403 (ranks 8-11)"
    )


def test_disabled_telemetry_serves_nowhere() -> None:
    from moe_dist.telemetry.handle import Telemetry

    assert Telemetry().serving() is None
