"""``model.compile``: every block compiled (the MoE layer inside eager except its gate) gives the
eager model's loss and gradients, and compiles once: no recompile in later steps. Compiling on CPU
takes tens of seconds, hence ``slow``."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from train_helpers import tiny_model_config

from moe_dist.models import build_model


def _model(compiled: bool):  # noqa: ANN202
    cfg = tiny_model_config(compile=compiled)
    model = build_model(cfg, seed=1)
    if cfg.compile:
        model.compile_blocks()
    return model


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_do_not_recompile() -> None:
    results = []
    for compiled in (False, True):
        model = _model(compiled)
        torch._dynamo.reset()
        counters.clear()
        losses, graphs = [], []
        for step in range(3):
            x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
            logits, aux, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten()) + aux
            loss.backward()
            losses.append(float(loss))
            graphs.append(counters["stats"]["unique_graphs"])
        results.append((losses, [p.grad.clone() for p in model.parameters()], graphs))
    (eager_losses, eager_grads, _), (losses, grads, graphs) = results
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0], f"graphs compiled after each step: {graphs}"
    # the blocks (split around the eager MoE layer) and the gates (one graph for both layers)
    assert graphs[0] == 3, graphs
