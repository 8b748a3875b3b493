"""Every router and every balancing loss, chosen by name in a YAML file, runs through the full
MoELayer at EP=2 on 2 real processes: forward + backward, finite output, aux terms and gradients;
then finish_step keeps the non-gradient router state (bias, EMA keys) identical on both ranks.

Shape legend: B batch, S sequence, H hidden size, E experts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rank_processes import run_on_ranks

from moe_dist.config import load_config
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.registry import LOSSES, ROUTERS
from moe_dist.training.step_hook import finish_step

H, E, B, S = 16, 4, 2, 5

# (router section, loss sections): together they name every built-in router and loss.
CASES: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
    (
        {"name": "topk_softmax", "top_k": 2, "init": "orthogonal"},
        [{"name": "simbal", "coef": 0.1}, {"name": "z_loss", "coef": 1e-5}],
    ),
    (
        {"name": "topk_softmax", "top_k": 2},
        [{"name": "switch"}, {"name": "global_batch"}, {"name": "seq_aux"}],
    ),
    (
        {"name": "topk_sigmoid_bias", "top_k": 2, "n_group": 2, "topk_group": 1, "bias_update_rate": 0.01},
        [{"name": "seq_aux", "coef": 1e-4}],
    ),
    ({"name": "lpr", "top_k": 2, "latent_dim": 8, "ema_keys": True}, []),
    ({"name": "expert_choice", "capacity_factor": 1.5}, [{"name": "z_loss", "coef": 1e-3}]),
]


def write_yaml(tmp: Path, i: int, router: dict, losses: list[dict]) -> str:
    data = {
        "model": {
            "dim": H,
            "moe": {"num_experts": E, "router": router, "losses": losses, "experts": {"ffn_hidden_size": 8}},
        },
        "parallel": {"ep_size": 2},
    }
    path = tmp / f"case{i}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _body(rank: int, world: int, paths: list[str]) -> list[dict]:
    groups = ParallelGroups.build(ep_size=2)
    out = []
    for path in paths:
        cfg = load_config(path)
        torch.manual_seed(0)
        layer = MoELayer(cfg.model.moe, H, groups)
        x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
        y, aux = layer(x)
        total = y.square().mean() + sum(aux.values())
        total.backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        finish_step([layer], groups)
        out.append(
            {
                "router": type(layer.gate.router).registry_name,
                "y_finite": bool(torch.isfinite(y).all()) and y.shape == x.shape,
                "aux": {k: float(v) for k, v in aux.items()},
                "x_grad_finite": x.grad is not None and bool(torch.isfinite(x.grad).all()),
                "missing_grads": [n for n, g in grads.items() if g is None],
                "bad_grads": [n for n, g in grads.items() if g is not None and not torch.isfinite(g).all()],
                "router_grad_norm": sum(
                    float(g.norm())
                    for n, g in grads.items()
                    if n.startswith("gate.router.") and g is not None
                ),
                "buffers": {
                    n: b.clone()
                    for n, b in layer.gate.router.named_buffers()
                    if n in ("expert_bias_E", "ema_sums_ED")
                },
                "keys": layer.gate.router.expert_keys.detach().clone()
                if hasattr(layer.gate.router, "expert_keys")
                else None,
            }
        )
    return out


@pytest.mark.slow
def test_every_router_and_loss_from_yaml_through_the_layer_at_ep2(tmp_path: Path) -> None:
    named_routers = {c[0]["name"] for c in CASES}
    named_losses = {loss["name"] for c in CASES for loss in c[1]}
    assert named_routers == set(ROUTERS.names()) and named_losses == set(LOSSES.names())
    paths = [write_yaml(tmp_path, i, r, losses) for i, (r, losses) in enumerate(CASES)]
    ranks = run_on_ranks(_body, 2, (paths,))
    for i, (router_cfg, losses) in enumerate(CASES):
        for rank in (0, 1):
            res = ranks[rank][i]
            where = (router_cfg["name"], rank)
            assert res["router"] == router_cfg["name"], where
            assert res["y_finite"] and res["x_grad_finite"], where
            assert res["missing_grads"] == [] and res["bad_grads"] == [], (where, res)
            assert res["router_grad_norm"] > 0, where
            want = {loss["name"] for loss in losses}
            if router_cfg["name"] == "lpr":
                want |= {"lpr_diversity", "lpr_kl", "lpr_align"}
            assert set(res["aux"]) == want, where
            assert all(math.isfinite(v) and v >= 0 for v in res["aux"].values()), (where, res["aux"])
        # Non-gradient router state: changed by finish_step, identical on both ranks.
        for name in ranks[0][i]["buffers"]:
            assert torch.equal(ranks[0][i]["buffers"][name], ranks[1][i]["buffers"][name]), name
        if ranks[0][i]["keys"] is not None:
            assert torch.equal(ranks[0][i]["keys"], ranks[1][i]["keys"])
    bias = ranks[0][2]["buffers"]["expert_bias_E"]
    assert bias.abs().max().item() == pytest.approx(0.01)
