"""Multi-rank export semantics with real gloo processes and real MoE layers: world 4 = DP 2 x EP 2,
with a capacity factor so tokens are dropped.

Expected layout (E = 4 experts, e = 2 per EP rank; ranks = dp * EP + ep):

    rank 0 (dp 0, ep 0)  hosts experts 0, 1   exports them, summed over replicas (ranks 0 and 2)
    rank 1 (dp 0, ep 1)  hosts experts 2, 3   exports them, summed over replicas (ranks 1 and 3)
    rank 2 (dp 1, ep 0)  hosts experts 0, 1   exports no per-expert series
    rank 3 (dp 1, ep 1)  hosts experts 2, 3   exports no per-expert series
    rank 0 alone exports the per-layer statistics.

So the cluster exports exactly L x E expert series, and their values are the tokens the experts
actually received: routed - dropped, summed over the group.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from rank_processes import run_on_ranks

pytestmark = pytest.mark.slow

WORLD, EP, LAYERS, EXPERTS, STEPS = 4, 2, 2, 4, 3


def _rank_body(rank: int, world_size: int, sd_dir: str) -> dict:
    from moe_dist.config import config_from_dict
    from moe_dist.layers.moe_layer import MoELayer
    from moe_dist.parallel.groups import ParallelGroups
    from moe_dist.telemetry import start_telemetry
    from moe_dist.training.step_hook import finish_step

    cfg = config_from_dict(
        {
            "model": {
                "dim": 16,
                "moe": {
                    "num_experts": EXPERTS,
                    "capacity_factor": 0.5,
                    "router": {"name": "topk_softmax", "top_k": 2},
                },
            },
            "parallel": {"ep_size": EP},
            "telemetry": {"enabled": True, "port_base": 0, "file_sd_path": sd_dir},
        }
    )
    groups = ParallelGroups.build(EP)
    torch.manual_seed(0)  # same router weights on every rank
    layers = [MoELayer(cfg.model.moe, 16, groups) for _ in range(LAYERS)]
    tel = start_telemetry(
        cfg.telemetry,
        groups,
        job_id="ranks",
        model_name="m",
        router_name="topk_softmax",
        local_rank=rank,
        node=f"node{rank // 2}",
    )
    torch.manual_seed(100 + rank)  # different tokens per rank
    routed = torch.zeros(LAYERS, EXPERTS)
    received = torch.zeros(LAYERS, EXPERTS)
    dropped = torch.zeros(LAYERS)
    for step in range(1, STEPS + 1):
        x = torch.randn(2, 8, 16) * (1 + rank)
        for layer in layers:
            x, _ = layer(x)
        counts = finish_step(layers, groups)
        routed += torch.stack(counts.counts_E)
        received += torch.stack(counts.received_E)
        dropped += torch.stack(counts.dropped)
        tel.on_step(step, layers, counts, step_seconds=0.1, tokens=16)
    tel.flush()
    body = urllib.request.urlopen(tel.url, timeout=10).read().decode()
    targets = json.loads(next(Path(sd_dir).glob("*.json")).read_text()) if rank == 0 else None
    torch.distributed.barrier()  # every rank scraped before anyone closes
    port = tel.server.port
    tel.close({})
    return {
        "body": body,
        "port": port,
        "routed": routed,
        "received": received,
        "dropped": dropped,
        "targets": targets,
    }


def samples(body: str, name: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_each_expert_is_exported_once_with_group_summed_received_tokens(tmp_path: Path) -> None:
    res = run_on_ranks(_rank_body, WORLD, (str(tmp_path) + "/",))
    routed, received, dropped = res[0]["routed"], res[0]["received"], res[0]["dropped"]
    assert dropped.sum() > 0, "capacity 0.5 must drop tokens, or this test proves nothing"
    # conservation: what the router assigned = what experts received + what capacity dropped
    torch.testing.assert_close(received.sum(1) + dropped, routed.sum(1))
    exported: dict[tuple[str, str], float] = {}
    for rank, r in enumerate(res):
        experts = samples(r["body"], "moe_expert_tokens_total")
        dp_rank, ep_rank = divmod(rank, EP)
        if dp_rank > 0:
            assert experts == {}, f"rank {rank} (expert-DP replica {dp_rank}) must not export experts"
            continue
        hosted = {str(e) for e in range(ep_rank * 2, ep_rank * 2 + 2)}
        for labels, value in experts.items():
            d = dict(labels)
            assert d["expert"] in hosted, f"rank {rank} exported expert {d['expert']} it does not host"
            assert (d["layer"], d["expert"]) not in exported
            exported[d["layer"], d["expert"]] = value
    assert exported == {
        (str(i), str(e)): float(received[i, e]) for i in range(LAYERS) for e in range(EXPERTS)
    }
    # per-layer statistics: rank 0 only, over the routed load
    for rank, r in enumerate(res):
        drops = samples(r["body"], "moe_layer_dropped_tokens_total")
        assert (
            (drops == {(("layer", str(i)),): float(dropped[i]) for i in range(LAYERS)})
            if rank == 0
            else not drops
        )
        assert samples(r["body"], "moe_train_step") == {(): float(STEPS)}
    # the straggler signal averages to 1 over the ranks
    ratios = [samples(r["body"], "moe_rank_received_tokens_ratio")[()] for r in res]
    assert sum(ratios) == pytest.approx(WORLD)
    # service discovery: every rank's actual port, with its labels
    groups = res[0]["targets"]
    assert [g["targets"][0] for g in groups] == [f"127.0.0.1:{r['port']}" for r in res]
    assert [(g["labels"]["rank"], g["labels"]["node"]) for g in groups] == [
        (str(r), f"node{r // 2}") for r in range(WORLD)
    ]
    assert list(tmp_path.glob("*.json")) == []  # withdrawn at a clean close
