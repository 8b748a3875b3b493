"""Learning-rate schedules (``training/optim.py``): every kind at its phase boundaries, by hand,
and ``wsd`` against transformers' own ``get_wsd_schedule`` at every step."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.config import OptimizerConfig, ScheduleConfig, config_from_dict
from moe_dist.config.errors import ConfigError
from moe_dist.training.optim import lr_at, lr_factor


def test_wsd_phase_boundaries_by_hand() -> None:
    # 100 steps: warmup 10, decay 20 -> stable 70; min 0.05. HF's warmup starts at m, not 0.
    s = ScheduleConfig(kind="wsd", steps=100, warmup_steps=10, decay_steps=20, min_lr_ratio=0.05)
    assert lr_factor(0, s) == pytest.approx(0.05)
    assert lr_factor(5, s) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(9, s) == pytest.approx(0.05 + 0.95 * 0.9)
    assert lr_factor(10, s) == 1.0 and lr_factor(79, s) == 1.0  # stable
    assert lr_factor(80, s) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_factor(90, s) == pytest.approx(0.05 + 0.95 * 0.5)  # cosine half-way
    assert lr_factor(99, s) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert lr_factor(100, s) == pytest.approx(0.05)  # after the schedule: the floor
    lin = s.model_copy(update={"decay_shape": "linear"})
    assert lr_factor(90, lin) == pytest.approx(0.05 + 0.95 * 0.5)
    sq = s.model_copy(update={"decay_shape": "1-sqrt"})
    assert lr_factor(85, sq) == pytest.approx(0.05 + 0.95 * (1 - math.sqrt(0.25)))
    assert lr_at(10, OptimizerConfig(lr=1e-3), s) == pytest.approx(1e-3)


def test_wsd_default_split_is_lprs() -> None:
    s = ScheduleConfig(kind="wsd", steps=4000, warmup_steps=200, min_lr_ratio=0.05)  # LPR: 5 / 75 / 20 %
    assert s.wsd_decay_steps() == 800
    assert lr_factor(3199, s) == 1.0 and lr_factor(3200, s) == 1.0 and lr_factor(3201, s) < 1.0


@pytest.mark.parametrize("shape", ["cosine", "linear", "1-sqrt"])
def test_wsd_equals_transformers_get_wsd_schedule(shape: str) -> None:
    transformers = pytest.importorskip("transformers")
    s = ScheduleConfig(
        kind="wsd", steps=60, warmup_steps=3, decay_steps=12, min_lr_ratio=0.05, decay_shape=shape
    )
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = transformers.get_wsd_schedule(
        opt, num_warmup_steps=3, num_stable_steps=45, num_decay_steps=12, min_lr_ratio=0.05, decay_type=shape
    )
    for step in range(64):
        assert lr_factor(step, s) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_cosine_linear_constant_with_warmup_start() -> None:
    base = {"steps": 50, "warmup_steps": 10, "min_lr_ratio": 0.1, "warmup_start_ratio": 0.1}
    cos = ScheduleConfig(kind="cosine", **base)
    assert lr_factor(0, cos) == pytest.approx(0.1 + 0.9 * 0.1)  # SimBal: from 10% of the peak
    assert lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(30, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(50, cos) == pytest.approx(0.1)
    lin = ScheduleConfig(kind="linear", **base)
    assert lr_factor(30, lin) == pytest.approx(0.1 + 0.9 * 0.5) and lr_factor(50, lin) == pytest.approx(0.1)
    const = ScheduleConfig(kind="constant", **base)
    assert lr_factor(10, const) == 1.0 and lr_factor(49, const) == 1.0
    # the default (no warmup start) is the schedule of earlier releases: (step + 1) / W
    assert lr_factor(0, ScheduleConfig(steps=50, warmup_steps=10)) == pytest.approx(0.1)


def test_wsd_longer_than_the_run_is_a_config_error() -> None:
    data = {"schedule": {"kind": "wsd", "steps": 20, "warmup_steps": 5, "decay_steps": 16}}
    with pytest.raises(ConfigError, match=r"schedule.decay_steps: warmup \(5\) \+ decay \(16\) must be <= "):
        config_from_dict(data)
