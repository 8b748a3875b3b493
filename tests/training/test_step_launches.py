"""A steady step's launch count does not grow with the number of parameters outside the layers'
own compute: the gradient norm, the clip, the optimizer and the reset of the layers' load
statistics are multi-tensor ops. On a GPU each op
is a kernel launch of host time, and a small model is host-bound (``docs/performance.md``);
``tools/step_launches.py`` counts the device ops of a step, the CPU stand-in for launches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from train_helpers import tiny_data

from tools.step_launches import count_step


def _count(tmp_path: Path, n_layers: int) -> dict[str, Any]:
    path = tmp_path / f"tiny{n_layers}.yaml"
    data = tiny_data(
        tmp_path,
        "parallel.ep_size=1",
        "model.moe.experts.backend=grouped_mm",
        f"model.n_layers={n_layers}",
        "optim.grad_clip=1.0",
    )
    path.write_text(yaml.safe_dump(data))
    return count_step(str(path), ["run.device=cpu"], warmup=1)


def test_norm_clip_and_optimizer_launches_do_not_grow_with_depth(tmp_path: Path) -> None:
    two, four = _count(tmp_path, 2), _count(tmp_path, 4)
    assert four["phases"]["forward"] > two["phases"]["forward"]  # the counter sees the layers
    for phase in ("clip", "optimizer", "after_step"):
        assert two["phases"][phase] == four["phases"][phase], (phase, two["phases"], four["phases"])
    # norm of each group, their sum, the scale, one multi-tensor multiply, the finite check
    assert four["phases"]["clip"] <= 20, four["ops"]
