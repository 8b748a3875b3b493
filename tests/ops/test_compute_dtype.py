"""Under bf16 autocast (CPU autocast stands in for CUDA's) the experts' GEMMs receive bf16 operands,
on both expert paths, the shared experts too, and the layer returns the residual stream's dtype;
expert weights are cast once per optimizer update, not per micro-batch or layer call.

Shape legend: B batch, S sequence, H hidden, E experts.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.ops import compute_dtype as cd
from moe_dist.ops import expert_mlp, grouped_expert_mlp

H = 16


def _layer(backend: str, shared: int = 0) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=4,
        router={"name": "topk_softmax", "top_k": 2},
        experts={"ffn_hidden_size": 32, "backend": backend},
        shared_experts={"count": shared, "ffn_hidden_size": 16},
        fused_kernels="eager",
    )
    return MoELayer(cfg, H)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_expert_gemms_get_bf16_operands_under_cpu_autocast(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[torch.dtype, torch.dtype]] = []

    def spy(real):  # noqa: ANN001, ANN202
        def run(a: torch.Tensor, b: torch.Tensor, *args, **kw):  # noqa: ANN002, ANN003
            seen.append((a.dtype, b.dtype))
            return real(a, b, *args, **kw)

        return run

    if backend == "loop":
        monkeypatch.setattr(expert_mlp, "matmul", spy(expert_mlp.matmul))
    else:
        monkeypatch.setattr(grouped_expert_mlp, "_grouped_mm", spy(grouped_expert_mlp._grouped_mm))
    layer = _layer(backend, shared=1)
    x = torch.randn(2, 8, H, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    y.float().square().sum().backward()
    assert seen and all(dt == (torch.bfloat16, torch.bfloat16) for dt in seen), seen
    # forward (2 GEMMs per expert group) and backward (4) went through the spied kernels
    assert len(seen) >= 6
    assert y.dtype == torch.float32  # the residual stream's dtype comes back
    assert layer.experts.w13_eHG.grad.dtype == torch.float32  # fp32 master gradients
    assert layer.shared_experts.w13_HG.grad.dtype == torch.float32


def test_without_autocast_the_layer_computes_in_its_input_dtype() -> None:
    layer = _layer("loop")
    x = torch.randn(2, 8, H)
    assert cd.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cd.compute_dtype(x) == torch.bfloat16
    y, _ = layer(x)
    assert y.dtype == torch.float32


def test_weights_are_cast_once_per_optimizer_update() -> None:
    """Micro-batches and layer calls between two updates reuse one bf16 copy of each expert
    weight; the optimizer's in-place update makes the next call cast again; gradients of all
    micro-batches add up in fp32."""
    layer = _layer("loop")
    casts: list[torch.Tensor] = []
    real_to = torch.Tensor.to

    def counting_to(t: torch.Tensor, *args, **kw):  # noqa: ANN002, ANN003
        out = real_to(t, *args, **kw)
        if t.shape == layer.experts.w13_eHG.shape and out.dtype == torch.bfloat16 and out is not t:
            casts.append(out)
        return out

    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=True)
    torch.Tensor.to = counting_to  # type: ignore[method-assign]
    try:
        for _step in range(2):
            for _micro in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y, _ = layer(torch.randn(2, 8, H))
                y.float().sum().backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.Tensor.to = real_to  # type: ignore[method-assign]
    assert len(casts) == 2, f"{len(casts)} casts of w13 for 2 steps x 3 micro-batches"


def test_cast_weight_backward_gives_the_parameters_dtype() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    a = cd.cast_weight(w, torch.bfloat16)
    b = cd.cast_weight(w, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.data_ptr() == b.data_ptr()  # one copy, two uses
    (a.float().sum() + 2 * b.float().sum()).backward()
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, torch.full((4, 3), 3.0))
    with torch.no_grad():
        w.add_(1.0)  # an update: the next call casts anew
    assert cd.cast_weight(w, torch.bfloat16).data_ptr() != a.data_ptr()
    assert torch.equal(cd.cast_weight(w, torch.bfloat16).float(), w.detach().to(torch.bfloat16).float())
