"""Every registered router and loss in a bf16 module: our layer cast to bf16, DeepSpeed's MoE with
bf16 parameters and Megatron-Core's router with bf16 parameters (CPU). Forward and backward run,
and the outputs are close to the same module in fp32.

Shape legend: B batch, S sequence, H hidden, E experts.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from integration_helpers import H, moe_config, transformer_config, valid_losses  # noqa: E402
from rank_processes import run_on_ranks  # noqa: E402

from moe_dist.layers.moe_layer import MoELayer  # noqa: E402
from moe_dist.registry import ROUTERS  # noqa: E402

BF16 = {"rtol": 5e-2, "atol": 3e-2}


def _cases() -> list[tuple[dict, list[dict]]]:
    """Every registered router with every loss it accepts."""
    return [({"name": name, "top_k": 2}, valid_losses(name)) for name in ROUTERS.names()]


def _input(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 6, H, generator=torch.Generator().manual_seed(seed))


def _forward_backward(module, x: torch.Tensor, seed: int = 7):  # noqa: ANN001, ANN202
    """(output, aux terms, input gradient, router gradients) of ``module(x)``; LPR samples, so
    both precisions draw the same noise."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = module(x)
    y, aux = (out[0], out[1]) if isinstance(out, tuple) and isinstance(out[1], dict) else (out[0], {})
    total = y.float().square().sum() + sum(v.float() for v in aux.values())
    if isinstance(out, tuple) and isinstance(out[1], torch.Tensor):  # DeepSpeed: (out, l_aux, counts)
        total = total + out[1].float()
    total.backward()
    return y, aux, x.grad


@pytest.mark.parametrize("router_name", sorted(ROUTERS.names()))
def test_our_layer_in_bf16_is_close_to_fp32(router_name: str) -> None:
    router, losses = {"name": router_name, "top_k": 2}, valid_losses(router_name)
    assert losses, router_name
    torch.manual_seed(0)
    fp32 = MoELayer(moe_config(router, losses), H)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    x = _input()
    y32, aux32, gx32 = _forward_backward(fp32, x)
    y16, aux16, gx16 = _forward_backward(bf16, x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and gx16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, **BF16)
    torch.testing.assert_close(gx16.float(), gx32, **BF16)
    assert aux16.keys() == aux32.keys() and len(aux32) >= len(losses)
    for name in aux32:
        torch.testing.assert_close(aux16[name].float(), aux32[name], rtol=5e-2, atol=1e-3, msg=name)
    for (name, p16), p32 in zip(bf16.gate.router.named_parameters(), fp32.gate.router.parameters()):
        assert p16.dtype == torch.bfloat16
        if p32.grad is None:
            continue
        assert p16.grad is not None and torch.isfinite(p16.grad.float()).all(), name
        scale = float(p32.grad.abs().max()) + 1e-3
        assert float((p16.grad.float() - p32.grad).abs().max()) <= 0.1 * scale, name


@pytest.mark.parametrize("router_name", sorted(ROUTERS.names()))
def test_deepspeed_moe_with_bf16_parameters(router_name: str) -> None:
    from moe_dist.integrations.deepspeed_moe import build_deepspeed_moe, copy_from_native

    cfg = moe_config({"name": router_name, "top_k": 2}, valid_losses(router_name))
    torch.manual_seed(0)
    native = MoELayer(cfg, H)
    moe = build_deepspeed_moe(cfg, H)
    copy_from_native(moe, native)
    moe16 = copy.deepcopy(moe).to(torch.bfloat16)
    x = _input()
    y32, _, gx32 = _forward_backward(moe, x)
    y16, _, gx16 = _forward_backward(moe16, x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, **BF16)
    torch.testing.assert_close(gx16.float(), gx32, **BF16)
    router16 = moe16.deepspeed_moe.gate.gate.router
    assert all(p.grad is None or torch.isfinite(p.grad.float()).all() for p in router16.parameters())


def _megatron_bf16_body(rank: int, world_size: int, cases: list[tuple[dict, list[dict]]]) -> list[dict]:
    from megatron.core import parallel_state as ps

    from moe_dist.integrations.megatron import MoeDistRouter

    ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=1)
    out = []
    for router, losses in cases:
        if router["name"] == "lpr":
            router = {**router, "add_decoded_latent": False}  # Megatron dispatches hidden states unchanged
        cfg = moe_config(router, losses)
        tc = transformer_config(cfg)
        routers = []
        for _ in range(2):  # the same weights twice (it holds process groups: no deepcopy)
            torch.manual_seed(0)
            routers.append(MoeDistRouter(tc, moe_cfg=cfg))
            routers[-1].set_layer_number(1)
        r32, r16 = routers[0], routers[1].to(torch.bfloat16)
        x_SBH = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(5))
        res = []
        for r, x in ((r32, x_SBH), (r16, x_SBH.to(torch.bfloat16))):
            torch.manual_seed(9)
            probs, routing_map = r(x)
            probs.float().square().sum().backward()
            res.append((probs.detach().float(), routing_map, [p.grad for p in r.gate.router.parameters()]))
        (p32, m32, g32), (p16, m16, g16) = res
        out.append(
            {
                "router": router["name"],
                "dprobs": float((p16 - p32).abs().max()),
                "map_agrees": float((m16 == m32).float().mean()),
                "grads_finite": all(g is None or bool(torch.isfinite(g.float()).all()) for g in g16),
                "grads_dtype": all(g is None or g.dtype == torch.bfloat16 for g in g16),
            }
        )
    ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_megatron_router_with_bf16_parameters() -> None:
    (results,) = run_on_ranks(_megatron_bf16_body, 1, (_cases(),))
    assert {r["router"] for r in results} == set(ROUTERS.names())
    for r in results:
        # bf16 rounding may flip a near-tie in top-k for a token or two, never most of them
        assert r["map_agrees"] >= 0.9 and r["grads_finite"] and r["grads_dtype"], r
        assert r["dprobs"] < 5e-2, r
