"""Our MoELayer on CUDA at EP = 1: bf16 grouped_mm path with compiled elementwise kernels, no host
synchronisation in forward and backward, the same output and gradients as the CPU float32 layer
(bf16 tolerance), and bitwise the same gradients every time (no atomics in the row moves).

Shape legend: T tokens, H hidden, E experts. Run on the device machine (tests/gpu/README.md).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.ops.compiled import compile_failures

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
T, H, E = 512, 128, 8


def test_ep1_layer_on_cuda_never_syncs_and_matches_cpu() -> None:
    cfg = MoEConfig(
        num_experts=E,
        router={"name": "topk_softmax", "top_k": 2},
        losses=[{"name": "switch", "coef": 0.01}],
        experts={"ffn_hidden_size": 256},
    )
    torch.manual_seed(0)
    cpu = MoELayer(cfg, H)
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    x = torch.randn(T, H)
    gy = torch.randn(T, H)
    x_cpu = x.clone().requires_grad_()
    y_cpu, aux_cpu = cpu(x_cpu)
    ((y_cpu * gy).sum() + sum(aux_cpu.values())).backward()

    x_gpu = x.to("cuda", torch.bfloat16).requires_grad_()
    assert gpu.experts.use_grouped_mm(x_gpu), "grouped_mm is not usable here (needs bf16 on Hopper)"
    y_warm, _ = gpu(x_gpu)  # compiles the fused kernels (compiling may synchronise)
    y_warm.sum().backward()
    assert not compile_failures(), compile_failures()
    gpu.zero_grad(set_to_none=True)
    x_gpu.grad = None
    gy_gpu = gy.to("cuda", torch.bfloat16)  # the test's own copy, before the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        y_gpu, aux_gpu = gpu(x_gpu)
        ((y_gpu * gy_gpu).sum() + sum(aux_gpu.values())).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(y_gpu.float().cpu(), y_cpu.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(x_gpu.grad.float().cpu(), x_cpu.grad, rtol=5e-2, atol=5e-2)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        scale = p_cpu.grad.abs().max().item()
        err = (p_gpu.grad.float().cpu() - p_cpu.grad).abs().max().item()
        assert err <= 0.05 * scale + 1e-3, f"{name}: grad off by {err:.3g} (scale {scale:.3g})"


def test_ep1_layer_gradients_are_bitwise_reproducible_on_cuda() -> None:
    cfg = MoEConfig(
        num_experts=E,
        router={"name": "topk_softmax", "top_k": 4},
        experts={"ffn_hidden_size": 256},
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg, H).to("cuda", torch.bfloat16)
    x = torch.randn(4 * T, H, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_()
        y, _ = layer(x_)
        y.float().square().sum().backward()
        grads.append([x_.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))
