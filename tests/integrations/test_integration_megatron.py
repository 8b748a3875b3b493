"""moe_dist routers and losses inside Megatron-Core (CPU, gloo) against the native router and MoELayer.

Shape legend: S sequence, B batch, T = S * B tokens, H hidden, E experts, F ffn hidden.
Megatron's MoE layer needs CUDA for EP > 1 forwards and the all-to-all dispatcher; on CPU we run
the router at EP = 1 and 2 and the whole layer at world size 1 with the allgather dispatcher.
The CUDA checks are in tests/gpu/.
"""

from __future__ import annotations

import pytest
import torch
from integration_helpers import E, H, moe_config, transformer_config, valid_losses
from rank_processes import run_on_ranks

from moe_dist.integrations.megatron import routing_to_megatron


def test_routing_to_megatron_worked_example() -> None:
    probs, rmap = routing_to_megatron(
        torch.tensor([[2, 0], [1, -1]]), torch.tensor([[0.7, 0.3], [1.0, 0.0]]), 3
    )
    torch.testing.assert_close(probs, torch.tensor([[0.3, 0.0, 0.7], [0.0, 1.0, 0.0]]))
    assert rmap.tolist() == [[True, False, True], [False, True, False]]


def test_config_mapping() -> None:
    cfg = moe_config(
        {"name": "topk_softmax", "top_k": 2}, [{"name": "switch", "coef": 0.01}], capacity_factor=1.25
    )
    cfg.shared_experts.count, cfg.shared_experts.ffn_hidden_size = 2, 8
    tc = transformer_config(cfg)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (E, 2, 24)
    assert tc.gated_linear_unit and tc.moe_expert_capacity_factor == 1.25
    assert tc.moe_shared_expert_intermediate_size == 16
    assert tc.moe_router_load_balancing_type == "none" and tc.moe_aux_loss_coeff == 0.0


def _router_cases_body(
    rank: int, world_size: int, cases: list[tuple[dict, list[dict]]], layer_cases: list[tuple]
):
    """Every case in one process (Megatron's import costs ~15 s a process)."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world_size)
    out = [_router_case(rank, world_size, router, losses) for router, losses in cases]
    layers = [_layer_case(*case) for case in layer_cases]
    ps.destroy_model_parallel()
    return {"routers": out, "layers": layers}


def _router_case(rank: int, world_size: int, router: dict, losses: list[dict]) -> dict:
    """Our router inside MoeDistRouter vs the native one: probs, map, each term, tracker, gradients."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from moe_dist.integrations.megatron import MoeDistRouter
    from moe_dist.layers.moe_layer import MoELayer
    from moe_dist.parallel.groups import ParallelGroups

    cfg = moe_config(router, losses)
    torch.manual_seed(0)
    native = MoELayer(cfg, H, ParallelGroups.build(world_size))
    mr = MoeDistRouter(transformer_config(cfg, world_size), moe_cfg=cfg)
    mr.set_layer_number(1)
    mr.gate.router.load_state_dict(native.gate.router.state_dict())
    torch.manual_seed(50 + rank)
    S, B = 5, 3
    x_SBH = torch.randn(S, B, H)
    x_BSH = x_SBH.transpose(0, 1).contiguous()
    # native: batch-first tokens
    torch.manual_seed(9)
    routing, aux = native.gate(x_BSH.reshape(-1, H), B, S)
    sum(aux.values()).backward()
    # megatron: sequence-first tokens; probs carry the aux terms into the backward
    clear_aux_losses_tracker()
    torch.manual_seed(9)
    probs_TE, map_TE = mr(x_SBH)
    (probs_TE * 0).sum().backward()
    want_probs, want_map = routing_to_megatron(routing.experts_TK, routing.weights_TK, E)
    order = torch.arange(B * S).view(B, S).t().reshape(-1)  # sequence-first row -> batch-first row
    tracker = get_moe_layer_wise_logging_tracker()
    coefs = {x["name"]: x["coef"] for x in losses}
    out = {
        "dprobs": float((probs_TE.detach() - want_probs.detach()[order]).abs().max()),
        "map_equal": bool(torch.equal(map_TE, want_map[order])),
        "terms": {k: (float(v), float(mr.gate.last_aux[k])) for k, v in aux.items()},
        "logged": {k: (float(tracker[k]["values"][0]), float(aux[k]) / coefs.get(k, 1.0)) for k in aux},
        "grads": {
            n: float((p.grad - dict(mr.gate.router.named_parameters())[n].grad).abs().max())
            for n, p in native.gate.router.named_parameters()
            if p.grad is not None
        },
        "weight_is_ours": mr.weight is mr.gate.router.weight_EH,
        "counts": torch.equal(mr.gate.tokens_per_expert_E, native_counts(routing)),
    }
    # the step hook: same global counts and router update as the native layer's finish_step
    from moe_dist.integrations.megatron import after_step
    from moe_dist.training.step_hook import finish_step

    want, got = finish_step([native], ParallelGroups.build(world_size)), after_step(mr)
    out["after_step"] = float((want.counts_E[0] - got.counts_E[0]).abs().max())
    out["state_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(native.gate.router.state_dict().values(), mr.gate.router.state_dict().values())
    )
    return out


def native_counts(routing) -> torch.Tensor:  # noqa: ANN001
    return routing.counts_E()


ROUTERS_UNDER_TEST = ["topk_softmax", "topk_sigmoid_bias", "expert_choice", "lpr"]
LAYER_LOSSES = [
    {"name": "switch", "coef": 0.01},
    {"name": "z_loss", "coef": 0.001},
    {"name": "simbal", "coef": 0.1},
]


@pytest.mark.slow
def test_every_router_matches_native_and_full_layer_on_cpu() -> None:
    cases = []
    for name in ROUTERS_UNDER_TEST:
        router = {"name": name, "top_k": 2}
        if name == "lpr":
            router["add_decoded_latent"] = False  # Megatron dispatches the hidden states unchanged
        losses = valid_losses(name)
        assert losses
        cases.append((router, losses))
    top2 = {"name": "topk_softmax", "top_k": 2}
    (res,) = run_on_ranks(
        _router_cases_body, 1, (cases, [(top2, LAYER_LOSSES, None), (top2, LAYER_LOSSES, 1.0)])
    )
    for (router, _), r in zip(cases, res["routers"]):
        assert r["dprobs"] < 1e-6 and r["map_equal"] and r["weight_is_ours"] and r["counts"]
        for name, (native, ours) in r["terms"].items():
            assert abs(native - ours) < 1e-6, (router, name)
        for name, (logged, want) in r["logged"].items():
            assert abs(logged - want) < 1e-5 * max(1.0, abs(want)), (router, name)
        assert r["grads"] and max(r["grads"].values()) < 1e-6, (router, r["grads"])
        assert r["after_step"] == 0 and r["state_equal"], router
    # Megatron's whole MoELayer (allgather dispatcher, world size 1) with our router; dropless, then
    # capacity factor 1 (Megatron's "probs" drop policy keeps what the native dispatcher keeps)
    dropless, capped = res["layers"]
    for layer in (dropless, capped):
        assert layer["dy"] < 1e-5 and layer["dgx"] < 1e-5 and layer["dgw"] < 1e-5, layer
    assert dropless["dropped"] == (0.0, 0.0) and capped["dropped"][0] == capped["dropped"][1] > 0


@pytest.mark.slow
def test_router_ep2_two_processes() -> None:
    losses = [{"name": "switch", "coef": 0.01}, {"name": "global_batch", "coef": 0.01}]
    results = run_on_ranks(_router_cases_body, 2, ([({"name": "topk_softmax", "top_k": 2}, losses)], []))
    for res in results:
        (r,) = res["routers"]
        assert r["dprobs"] < 1e-6 and r["map_equal"] and max(r["grads"].values()) < 1e-6
        assert r["after_step"] == 0 and r["state_equal"]
        for name, (native, ours) in r["terms"].items():
            assert abs(native - ours) < 1e-6, name


def _layer_case(router: dict, losses: list[dict], capacity_factor: float | None) -> dict:
    """Megatron's whole MoELayer (allgather, SequentialMLP) with our router vs our native MoELayer."""
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer

    from moe_dist.integrations.megatron import (
        copy_experts_to_megatron,
        get_gpt_layer_spec_with_router,
        moe_submodules,
    )
    from moe_dist.layers.moe_layer import MoELayer

    cfg = moe_config(router, losses, capacity_factor)
    spec = get_gpt_layer_spec_with_router(cfg)
    layer = MegatronMoELayer(transformer_config(cfg), moe_submodules(spec.submodules.mlp), layer_number=1)
    layer.set_layer_number(1)
    torch.manual_seed(0)
    native = MoELayer(cfg, H)
    copy_experts_to_megatron(native, layer)
    torch.manual_seed(1)
    x_SBH = torch.randn(5, 3, H)
    xs = [x_SBH.clone().requires_grad_(True), x_SBH.transpose(0, 1).contiguous().requires_grad_(True)]
    y_SBH, _ = layer(xs[0])
    (y_SBH.square().sum()).backward()
    y_BSH, aux = native(xs[1])
    (y_BSH.square().sum() + sum(aux.values())).backward()
    return {
        "dy": float((y_SBH.transpose(0, 1) - y_BSH).abs().max()),
        "dgx": float((xs[0].grad.transpose(0, 1) - xs[1].grad).abs().max()),
        "dgw": float((layer.router.gate.router.weight.grad - native.gate.router.weight.grad).abs().max()),
        "dropped": (float(layer.router.gate.dropped_tokens), float(native.gate.dropped_tokens)),
    }


@torch.no_grad()
def test_spec_forms_get_our_router_without_touching_the_original() -> None:
    """Spec forms: 0.16 ``ModuleSpec(MoELayer, submodules=..)``, 0.19 ``partial(MoELayer, ..)``."""
    import functools

    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter

    from moe_dist.integrations.megatron import (
        MoeDistRouter,
        get_gpt_layer_spec_with_router,
        moe_submodules,
        with_router,
    )

    cfg = moe_config({"name": "topk_softmax", "top_k": 2}, [{"name": "switch", "coef": 0.01}])
    sub = MoESubmodules(experts=None)
    partial_spec = functools.partial(MegatronMoELayer, submodules=sub, pg_collection=None)
    ours = with_router(partial_spec, cfg)
    assert isinstance(ours, functools.partial) and ours.func is MegatronMoELayer
    assert ours.keywords["pg_collection"] is None
    builder = ours.keywords["submodules"].router
    assert builder.func is MoeDistRouter and builder.keywords["moe_cfg"] is cfg
    assert partial_spec.keywords["submodules"].router is TopKRouter  # the original is untouched
    layer_spec = get_gpt_layer_spec_with_router(cfg)
    assert moe_submodules(layer_spec.submodules.mlp).router.func is MoeDistRouter
    with pytest.raises(TypeError, match="not an MoE layer spec"):
        with_router(functools.partial(MegatronMoELayer), cfg)
