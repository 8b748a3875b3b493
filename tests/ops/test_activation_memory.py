"""What one MoE layer keeps for its backward: within 1.2x of the activations its expert GEMMs need.

Shape legend: T tokens, H hidden, F ffn hidden, E experts, K top-k, S = T * K dispatched rows.

The expert GEMMs need their inputs for the weight gradients: the dispatched rows [S, H] and, for
SwiGLU's derivative, both pre-activations [S, F] (issue 10's memory yardstick). Everything the
layer saves for its backward is counted (``moe_dist.activation_memory``), once per storage,
parameters and the layer's own input left out (they exist without the layer). Before the routing
weights moved into the experts, the combine kept the [S, H] expert outputs and autograd kept
``silu(h1)`` and ``silu(h1) * h3`` as well: 1.5x at the first shape below.
"""

from __future__ import annotations

import pytest
import torch
from rank_processes import run_on_ranks

from moe_dist.activation_memory import saved_for_backward
from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups

# (H, F, E, K): the ratio F / H of the Mixtral-like shape (3.5) and Qwen3-like (0.375)
SHAPES = {"mixtral_like": (32, 112, 8, 2), "qwen3_like": (128, 48, 32, 8)}
TOKENS = 256


def _layer(H: int, Fh: int, E: int, K: int, groups: ParallelGroups) -> MoELayer:
    cfg = MoEConfig(
        num_experts=E,
        router={"name": "topk_softmax", "top_k": K},
        losses=[{"name": "switch", "coef": 0.01}],
        experts={"ffn_hidden_size": Fh, "activation": "swiglu"},
    )
    return MoELayer(cfg, H, groups)


def saved_bytes(layer: MoELayer, x_TH: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes one forward keeps for the backward (parameters and the input excluded), and the
    forward's output plus its losses."""
    got, (y, aux) = saved_for_backward(lambda: layer(x_TH), [*layer.parameters(), x_TH])
    return got, y + sum(aux.values())


def gemm_activation_bytes(rows: int, H: int, Fh: int, element_size: int = 4) -> int:
    return rows * (H + 2 * Fh) * element_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grouped_mm", [False, True], ids=["per_expert_loop", "grouped_mm"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ep1_saves_at_most_1_2x_the_gemm_activations(
    shape: str, grouped_mm: bool, dtype: torch.dtype
) -> None:
    """bf16 as on a GPU (the router still computes in fp32: it must not keep an fp32 copy of
    its input)."""
    H, Fh, E, K = SHAPES[shape]
    torch.manual_seed(0)
    layer = _layer(H, Fh, E, K, ParallelGroups.single()).to(dtype)
    layer.experts.backend = "grouped_mm" if grouped_mm else "loop"
    x = torch.randn(TOKENS, H, dtype=dtype, requires_grad=True)
    assert layer.experts.use_grouped_mm(x) == grouped_mm
    got, out = saved_bytes(layer, x)
    need = gemm_activation_bytes(TOKENS * K, H, Fh, x.element_size())
    assert need <= got <= 1.2 * need, f"{got / need:.3f}x the GEMM activations"
    out.sum().backward()  # what was kept is enough
    assert x.grad is not None and layer.gate.router.weight.grad.abs().sum() > 0


def _ep2_body(rank: int, world: int, shape: str) -> dict:
    H, Fh, E, K = SHAPES[shape]
    torch.manual_seed(0)
    layer = _layer(H, Fh, E, K, ParallelGroups.build(2))
    torch.manual_seed(1 + rank)
    x = torch.randn(TOKENS, H, requires_grad=True)
    got, out = saved_bytes(layer, x)
    out.sum().backward()
    return {"saved": got, "received": int(layer.gate.received_per_local_expert_e.sum())}


@pytest.mark.slow
def test_ep2_saves_at_most_1_2x_the_gemm_activations() -> None:
    """Across ranks the rows a rank's experts receive differ from the slots it sends: the kept
    rows are the received ones (the exchange keeps nothing, its backward is the reverse move)."""
    H, Fh, E, K = SHAPES["qwen3_like"]
    for res in run_on_ranks(_ep2_body, 2, ("qwen3_like",)):
        need = gemm_activation_bytes(res["received"], H, Fh)
        assert need <= res["saved"] <= 1.2 * need, f"{res['saved'] / need:.3f}x the GEMM activations"
