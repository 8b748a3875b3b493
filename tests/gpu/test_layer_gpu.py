"""Our MoELayer on CUDA at EP = 1: bf16 grouped_mm path, no host synchronisation in forward and
backward, and the same output and gradients as the CPU float32 layer (bf16 tolerance).

Shape legend: T tokens, H hidden, E experts. Run on the device machine (tests/gpu/README.md).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.layer import MoELayer

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
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        y_gpu, aux_gpu = gpu(x_gpu)
        ((y_gpu * gy.to(y_gpu)).sum() + sum(aux_gpu.values())).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(y_gpu.float().cpu(), y_cpu.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(x_gpu.grad.float().cpu(), x_cpu.grad, rtol=5e-2, atol=5e-2)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        scale = p_cpu.grad.abs().max().item()
        err = (p_gpu.grad.float().cpu() - p_cpu.grad).abs().max().item()
        assert err <= 0.05 * scale + 1e-3, f"{name}: grad off by {err:.3g} (scale {scale:.3g})"
