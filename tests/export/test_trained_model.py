"""``load_trained_model``: the same run saved as ``model.pt`` and as DCP shards loads the same weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moe_dist.models import build_model
from moe_dist.training.checkpoint_choice import CheckpointError
from moe_dist.training.trained_model import load_trained_model


@pytest.mark.slow  # trains two runs through the CLI
def test_torch_and_dcp_checkpoints_load_the_same_model(trained_run: Callable[..., Path]) -> None:
    torch_run = load_trained_model(trained_run("fmt_torch", "checkpoint.format=torch", steps=2))
    dcp_run = load_trained_model(trained_run("fmt_dcp", "checkpoint.format=dcp", steps=2))
    assert (dcp_run.checkpoint / ".metadata").is_file() and not (dcp_run.checkpoint / "model.pt").exists()
    assert torch_run.step == dcp_run.step == 2
    a, b = torch_run.model.state_dict(), dcp_run.model.state_dict()
    params = dict(torch_run.model.named_parameters())
    assert set(a) == set(b)
    for name in params:
        assert torch.equal(a[name], b[name]), name
    untrained = build_model(torch_run.cfg.model, seed=torch_run.cfg.run.seed)
    assert not torch.equal(untrained.embed.weight, a["embed.weight"])  # trained weights, not the seed's
    step_dir = load_trained_model(torch_run.checkpoint)  # a step_* directory works too
    assert torch.equal(step_dir.model.embed.weight, a["embed.weight"])


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_trained_model(tmp_path)
