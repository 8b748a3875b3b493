"""Megatron-Core's MoELayer with our router on CUDA (EP = 1, all-to-all dispatcher) vs our native MoELayer.

Shape legend: S sequence, B batch, H hidden, E experts. Run on the device machine (tests/gpu/README.md).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moe_dist.config import MoEConfig, validate_moe

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
H, E = 64, 8


@pytest.fixture(scope="module")
def megatron_world():  # noqa: ANN201
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from rank_processes import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(123)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def build(router: dict, losses: list[dict]):  # noqa: ANN201
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_dist.integrations.megatron import (
        copy_experts_to_megatron,
        get_gpt_layer_spec_with_router,
        moe_submodules,
        transformer_config_fields,
    )
    from moe_dist.layers.moe_layer import MoELayer

    cfg = MoEConfig(num_experts=E, router=router, losses=losses, experts={"ffn_hidden_size": 128})
    assert validate_moe(cfg, H) == []
    tc = TransformerConfig(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=4,
        add_bias_linear=False,
        moe_token_dispatcher_type="alltoall",
        **transformer_config_fields(cfg),
    )
    spec = get_gpt_layer_spec_with_router(cfg)
    layer = MegatronMoELayer(tc, moe_submodules(spec.submodules.mlp), layer_number=1).cuda()
    layer.set_layer_number(1)
    torch.manual_seed(0)
    native = MoELayer(cfg, H).cuda()
    copy_experts_to_megatron(native, layer)
    return layer, native


def test_megatron_layer_with_our_router_matches_native_on_cuda(megatron_world) -> None:  # noqa: ANN001
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    losses = [
        {"name": "switch", "coef": 0.01},
        {"name": "z_loss", "coef": 0.001},
        {"name": "simbal", "coef": 0.1},
    ]
    layer, native = build({"name": "topk_softmax", "top_k": 2}, losses)
    torch.manual_seed(1)
    x_SBH = torch.randn(16, 4, H, device="cuda")
    clear_aux_losses_tracker()
    y_SBH, _ = layer(x_SBH)
    y_BSH, aux = native(x_SBH.transpose(0, 1).contiguous())
    torch.testing.assert_close(y_SBH.transpose(0, 1), y_BSH, rtol=1e-4, atol=1e-5)
    tracker = get_moe_layer_wise_logging_tracker()
    for spec in losses:
        got = float(tracker[spec["name"]]["values"][0])
        assert got == pytest.approx(float(aux[spec["name"]]) / spec["coef"], rel=1e-4)
    torch.testing.assert_close(layer.router.gate.tokens_per_expert_E, native.gate.tokens_per_expert_E)


def test_short_training_run_lowers_the_loss(megatron_world) -> None:  # noqa: ANN001
    from moe_dist.integrations.megatron import after_step

    layer, _ = build({"name": "topk_sigmoid_bias", "top_k": 2}, [{"name": "seq_aux", "coef": 0.01}])
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    torch.manual_seed(2)
    x_SBH = torch.randn(32, 4, H, device="cuda")
    target_SBH = torch.tanh(x_SBH @ torch.randn(H, H, device="cuda") / H**0.5)
    losses = []
    for _ in range(30):
        y_SBH, _ = layer(x_SBH)
        loss = torch.nn.functional.mse_loss(y_SBH, target_SBH)
        loss.backward()  # the aux terms join through MoEAuxLossAutoScaler
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts = after_step(layer)
        losses.append(float(loss))
        assert float(counts.counts_E[0].sum()) == 32 * 4 * 2
    assert losses[-1] < 0.7 * losses[0], losses
    bias = layer.router.gate.router.expert_bias_E
    assert float(bias.abs().sum()) > 0  # the aux-loss-free bias moved in after_step
