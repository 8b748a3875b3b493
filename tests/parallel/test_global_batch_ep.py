"""Global-batch balancing at EP=2 on 2 real processes equals the single-process loss on the
concatenated batch: once with the counts all-reduced in the test body, once through MoELayer.

Shape legend: T tokens per rank, H hidden size, E experts, K slots per token.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from rank_processes import run_on_ranks

from moe_dist.balancing.base import Load
from moe_dist.balancing.global_batch import GlobalBatchLoss, GlobalBatchLossConfig
from moe_dist.balancing.switch import SwitchLoss, SwitchLossConfig
from moe_dist.config import config_from_dict
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.routing.topk_softmax import TopKSoftmaxConfig, TopKSoftmaxRouter

H, E, K, T, COEF = 8, 4, 2, 6, 0.5


def batch_TH() -> torch.Tensor:
    """Both ranks' tokens: rank r gets rows [r*T, (r+1)*T). Skewed so local and global counts differ."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2 * T, H, generator=g)
    x[:T] += 2.0  # rank 0's tokens share a direction, rank 1's do not
    return x


def make_router() -> TopKSoftmaxRouter:
    torch.manual_seed(0)
    return TopKSoftmaxRouter(TopKSoftmaxConfig(top_k=K), H, E)


def loss_and_grad(router: TopKSoftmaxRouter, x_TH: torch.Tensor, group: dist.ProcessGroup | None) -> dict:
    routing = router(x_TH)
    counts_E = routing.counts_E()
    total = torch.cat([counts_E, torch.tensor([float(x_TH.shape[0])])])
    if group is not None:
        dist.all_reduce(total, group=group)
    load = Load(counts_E, x_TH.shape[0], 1, x_TH.shape[0], total[:E], int(total[E]))
    loss = GlobalBatchLoss(GlobalBatchLossConfig(), E, K)(routing, load, router)
    local = SwitchLoss(SwitchLossConfig(), E, K)(routing, load, router)
    (grad,) = torch.autograd.grad(loss, router.weight)
    return {"loss": loss.detach(), "grad": grad, "local_switch": local.detach()}


def layer_cfg() -> dict:
    return {
        "model": {
            "dim": H,
            "moe": {
                "num_experts": E,
                "router": {"name": "topk_softmax", "top_k": K},
                "losses": [{"name": "global_batch", "coef": COEF}],
                "experts": {"ffn_hidden_size": 8},
            },
        },
        "parallel": {"ep_size": 2},
    }


def _body(rank: int, world: int) -> dict:
    x = batch_TH()[rank * T : (rank + 1) * T]
    by_hand = loss_and_grad(make_router(), x, dist.group.WORLD)
    groups = ParallelGroups.build(ep_size=2)
    torch.manual_seed(0)
    layer = MoELayer(config_from_dict(layer_cfg()).model.moe, H, groups)
    _, aux = layer(x)
    (grad,) = torch.autograd.grad(aux["global_batch"], layer.gate.router.weight)
    return {"by_hand": by_hand, "layer_aux": aux["global_batch"].detach(), "layer_grad": grad}


@pytest.mark.slow
def test_global_batch_at_ep2_equals_single_process_on_the_concatenated_batch() -> None:
    results = run_on_ranks(_body, 2)
    ref = loss_and_grad(make_router(), batch_TH(), None)
    hand = [r["by_hand"] for r in results]
    # Value: each rank's E * sum fbar P_local averages (equal T) to the concatenated batch's loss.
    assert ((hand[0]["loss"] + hand[1]["loss"]) / 2).item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    # Gradient: data-parallel averaging of the per-rank gradients gives the single-process one.
    assert torch.allclose((hand[0]["grad"] + hand[1]["grad"]) / 2, ref["grad"], atol=1e-7)
    # Really global: the micro-batch (local-f) Switch loss on these skewed halves differs.
    local_mean = (hand[0]["local_switch"] + hand[1]["local_switch"]) / 2
    assert abs(local_mean.item() - ref["loss"].item()) > 1e-3
    # Through MoELayer: the layer's own all-reduce of the counts gives the same numbers (times coef).
    for r in results:
        assert r["layer_aux"].item() == pytest.approx(COEF * r["by_hand"]["loss"].item(), rel=1e-6)
    layer_mean = (results[0]["layer_aux"] + results[1]["layer_aux"]) / 2
    assert layer_mean.item() == pytest.approx(COEF * ref["loss"].item(), rel=1e-6)
    grad_mean = (results[0]["layer_grad"] + results[1]["layer_grad"]) / 2
    assert torch.allclose(grad_mean, COEF * ref["grad"], atol=1e-7)
