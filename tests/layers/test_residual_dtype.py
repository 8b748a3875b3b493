"""The residual stream's dtype under bf16 autocast (CPU autocast stands in for CUDA's): bf16 by
default, as Megatron's default and FSDP's bf16 parameters give; fp32 with ``model.fp32_residual``
(Megatron's ``--fp32-residual-connection``); untouched without autocast. Either way the loss and
gradients stay close to an fp32 run's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_model_config

from moe_dist.models import build_model


def _model(fp32_residual: bool):  # noqa: ANN202
    moe = tiny_model_config().moe.model_dump()
    moe["experts"]["backend"] = "grouped_mm"
    cfg = tiny_model_config(fp32_residual=fp32_residual, moe=moe)
    return build_model(cfg, seed=1)


def _step(model, autocast: bool) -> tuple[list[torch.dtype], float, list[torch.Tensor]]:  # noqa: ANN001
    seen: list[torch.dtype] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for b in model.blocks]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, aux, _ = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), x.roll(-1, 1).flatten()) + aux
    loss.backward()
    for h in hooks:
        h.remove()
    return seen, float(loss), [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    ("fp32_residual", "autocast", "dtype"),
    [(False, True, torch.bfloat16), (True, True, torch.float32), (False, False, torch.float32)],
)
def test_residual_stream_dtype(fp32_residual: bool, autocast: bool, dtype: torch.dtype) -> None:
    model = _model(fp32_residual)
    seen, loss, grads = _step(model, autocast)
    assert seen == [dtype] * 3  # both blocks' inputs and the final norm's
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    _, want, want_grads = _step(_model(False), autocast=False)
    assert loss == pytest.approx(want, rel=2e-2)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        assert (g - w).norm() <= 0.1 * w.norm() + 1e-6
