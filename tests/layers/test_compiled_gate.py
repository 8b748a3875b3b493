"""``model.compile`` compiles each MoE layer's `Gate` (router, balancing losses, load statistics)
as its own region: the same routing, losses, statistics and gradients as the eager gate, for every
built-in router and loss, and one compile for every layer and step. The gate has static shapes at
any EP size (its dispatch is outside), so it compiles without graph breaks; on a GPU its ~25
small ops per layer and their backward become a few fused kernels (a small model is host-bound:
docs/performance.md). Compiling on CPU takes seconds per case, hence ``slow``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from moe_dist.config import config_from_dict
from moe_dist.layers.gate import Gate

T, H, E, K = 48, 32, 8, 2
SWITCH, Z = {"name": "switch", "coef": 0.01}, {"name": "z_loss", "coef": 1e-3}
SIMBAL, SEQ = {"name": "simbal", "coef": 0.01}, {"name": "seq_aux", "coef": 0.01}
GLOBAL = {"name": "global_batch", "coef": 0.01}
CASES = {
    "softmax_switch_z": ({"name": "topk_softmax", "top_k": K}, [SWITCH, Z]),
    "softmax_simbal_seq": ({"name": "topk_softmax", "top_k": K}, [SIMBAL, SEQ]),
    "softmax_lf_global": ({"name": "topk_softmax", "top_k": K, "bias_update_rate": 0.01}, [GLOBAL]),
    "sigmoid_bias": ({"name": "topk_sigmoid_bias", "top_k": K}, []),
    "expert_choice": ({"name": "expert_choice", "top_k": K}, []),
    "lpr": ({"name": "lpr", "top_k": K, "latent_dim": 8}, []),
}


def _gate(router: dict, losses: list) -> Gate:
    moe = config_from_dict(
        {"model": {"dim": H, "moe": {"num_experts": E, "router": router, "losses": losses}}}
    ).model.moe
    torch.manual_seed(0)
    return Gate(moe, H, model_scope=True)


def _run(gate: Gate, x_TH: torch.Tensor) -> tuple:
    x_TH = x_TH.clone().requires_grad_(True)
    routing, aux = gate(x_TH, 4, T // 4)
    slots = torch.arange(1.0, routing.weights_TK.shape[1] + 1)  # expert_choice has more than K
    total = (routing.weights_TK * slots).sum() + sum(aux.values())
    total.backward()
    grads = [x_TH.grad] + [p.grad for p in gate.parameters()]
    return routing, aux, grads


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_gate_equals_eager_and_compiles_once(case: str) -> None:
    router, losses = CASES[case]
    eager = _gate(router, losses)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    if router["name"] == "lpr":  # its training forward samples z: compare the deterministic eval path
        eager.eval()
        compiled.eval()
    torch._dynamo.reset()
    counters.clear()
    for step in range(3):
        x_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(step))
        want, got = _run(eager, x_TH), _run(compiled, x_TH)
        assert torch.equal(got[0].experts_TK, want[0].experts_TK), step
        torch.testing.assert_close(got[0].weights_TK, want[0].weights_TK, rtol=1e-5, atol=1e-6)
        assert got[1].keys() == want[1].keys()
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-7, msg=name)
        for g, w, p in zip(got[2], want[2], [None, *eager.parameters()]):
            if router["name"] == "lpr" and w is None:  # unused in eval (logvar): compiled gives zeros
                w = torch.zeros_like(p)
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        for (name, b), (_, c) in zip(eager.named_buffers(), compiled.named_buffers()):
            torch.testing.assert_close(c, b, msg=name)  # load statistics, router state
        for gate in (eager, compiled):
            for p in gate.parameters():
                p.grad = None
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
