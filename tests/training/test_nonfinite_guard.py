"""The loop's non-finite guard on both engines, with real gloo processes (world 2, EP 2).

A step turns non-finite on ONE rank through a balancing-loss plugin of this module,
`NonFiniteAtStep` (a real plugin in the real model, no engine mocked): in training forward
``step`` on rank ``rank`` its term is

- ``gradient``: 0 in value, an infinite gradient (the loss stays finite: the norm must catch it);
- ``loss``: +inf in value, a zero gradient (finite gradients: the loss must catch it; DeepSpeed's
  ZeRO would apply such a step by itself).

Every rank must skip that step (``skipped`` in the record, ``TrainResult.skipped_steps``, a line
on the console), its checkpoint must hold exactly the previous step's weights and optimizer
state, and training must go on with finite losses.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.distributed as dist
from rank_processes import run_on_ranks
from train_helpers import tiny_config

from moe_dist.balancing.base import BalancingLoss, Load, LossConfig
from moe_dist.config import Config
from moe_dist.registry import LOSSES
from moe_dist.routing.base import Router, Routing

BAD_STEP, BAD_RANK, STEPS = 3, 1, 5


class NonFiniteAtStepConfig(LossConfig):
    name: Literal["nonfinite_at_step"] = "nonfinite_at_step"
    step: int  # training forward number (= optimizer step at grad_accum 1), from 1
    rank: int
    kind: Literal["gradient", "loss"]


class _InfiniteGradient(torch.autograd.Function):
    """0 forward, an infinite gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


class NonFiniteAtStep(BalancingLoss):
    """A zero term, except in one training forward on one rank (module docstring)."""

    Config = NonFiniteAtStepConfig

    def __init__(self, cfg: NonFiniteAtStepConfig, num_experts: int, top_k: int) -> None:
        super().__init__(cfg, num_experts, top_k)
        self.training_calls = 0

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        term = routing.probs_TE.sum()
        zero = term * 0.0
        if not router.training:
            return zero
        self.training_calls += 1
        if self.training_calls != self.cfg.step or dist.get_rank() != self.cfg.rank:
            return zero
        return _InfiniteGradient.apply(term) if self.cfg.kind == "gradient" else zero + math.inf


@contextlib.contextmanager
def _registered() -> Iterator[None]:
    """The test loss is in the registry only while a config of this module is built: other tests
    list every registered loss, and collection imports this module into their session."""
    LOSSES.register("nonfinite_at_step")(NonFiniteAtStep)
    try:
        yield
    finally:
        LOSSES.unregister("nonfinite_at_step")


def _guarded_config(out: Path, engine: str, zero_stage: int, kind: str) -> Config:
    bad = f"{{name: nonfinite_at_step, coef: 1.0, step: {BAD_STEP}, rank: {BAD_RANK}, kind: {kind}}}"
    with _registered():
        return tiny_config(
            out,
            "run.name=guard",
            "run.device=cpu",
            "run.seed=3",
            f"model.moe.losses=[{{name: switch, coef: 0.01}}, {bad}]",
            "model.moe.experts.ffn_hidden_size=32",
            f"parallel.engine={engine}",
            f"parallel.zero_stage={zero_stage}",
            "optim.lr=1.0e-2",
            f"schedule.steps={STEPS}",
            "schedule.warmup_steps=1",
            "eval.batches=2",
            "checkpoint.every=1",
            f"checkpoint.keep={STEPS}",
        )


def _guarded_run(rank: int, world_size: int, cfg: Config) -> dict:
    LOSSES.register("nonfinite_at_step")(NonFiniteAtStep)  # this rank's process builds the layers
    from moe_dist.training.engines import engine_for
    from moe_dist.training.run import train

    stream = io.StringIO()
    result = train(cfg, engine_for(cfg), stream=stream)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
    return {
        "losses": result.losses,
        "skipped": result.skipped_steps,
        "console": stream.getvalue(),
        "records": [json.loads(line) for line in lines],
        "checkpoints": str(result.run_dir / "checkpoints"),
    }


def _tensors(obj: Any, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a loaded checkpoint file, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out |= _tensors(value, f"{path}/{key}")
    return out


def _checkpoint_state(ckpt_root: Path, step: int) -> dict[str, torch.Tensor]:
    """Weights and optimizer state of one checkpoint (either engine's files; RNG states left out)."""
    step_dir = ckpt_root / f"step_{step:06d}"
    state: dict[str, torch.Tensor] = {}
    for f in sorted(step_dir.rglob("*.pt")):
        if not f.name.startswith("rng_rank"):
            loaded = torch.load(f, map_location="cpu", weights_only=False)
            state |= _tensors(loaded, str(f.relative_to(step_dir)))
    assert state, f"no checkpoint files in {step_dir}"
    return state


def _unchanged(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_RUNS: dict[tuple[str, int, str], list[dict]] = {}


def _run(case: tuple[str, int, str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One 2-rank run per case, shared by the tests that look at it."""
    if case not in _RUNS:
        out = tmp_path_factory.mktemp("-".join(map(str, case)))
        _RUNS[case] = run_on_ranks(_guarded_run, 2, (_guarded_config(out, *case),))
    return _RUNS[case]


CASES = [
    ("native", 0, "gradient"),
    ("native", 0, "loss"),
    ("deepspeed", 0, "gradient"),  # DeepSpeed itself would apply it at ZeRO 0
    ("deepspeed", 1, "loss"),  # ... and a non-finite loss with finite gradients at ZeRO 1/2
    ("deepspeed", 2, "gradient"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(
    case: tuple[str, int, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    ranks = _run(case, tmp_path_factory)
    # every rank skipped the same step, and rank 0 said so
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [BAD_STEP]
    assert f"step {BAD_STEP}: non-finite" in ranks[0]["console"] and "step skipped" in ranks[0]["console"]
    records = ranks[0]["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["skipped"] for r in records] == [s == BAD_STEP for s in range(1, STEPS + 1)]
    # the norm is measured on both engines: finite and positive, except where it is not
    norms = {r["step"]: r["grad_norm"] for r in records}
    assert all(isinstance(n, float) and math.isfinite(n) and n > 0 for s, n in norms.items() if s != BAD_STEP)
    if case[2] == "gradient":
        assert not math.isfinite(norms[BAD_STEP])
        assert math.isfinite(ranks[0]["losses"][BAD_STEP])  # the task loss did not show it
    else:
        assert not math.isfinite(records[BAD_STEP - 1]["aux"]["nonfinite_at_step"])
        assert math.isfinite(norms[BAD_STEP])
    # the skipped step changed neither weights nor optimizer state; the next one did
    ckpt = Path(ranks[0]["checkpoints"])
    before, skipped, after = (_checkpoint_state(ckpt, s) for s in (BAD_STEP - 1, BAD_STEP, BAD_STEP + 1))
    assert _unchanged(before, skipped)
    assert not _unchanged(skipped, after)
    # training went on
    for s in range(BAD_STEP + 1, STEPS + 1):
        assert math.isfinite(ranks[0]["losses"][s]) and ranks[0]["losses"][s] == ranks[1]["losses"][s]


@pytest.mark.slow
def test_the_deepspeed_engine_records_the_native_gradient_norm(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Same weights, same data at step 1: the norm each engine records is the same number
    (ZeRO 0: ours over p.grad; ZeRO 1/2: DeepSpeed's over its gradient partitions)."""
    native = _run(("native", 0, "gradient"), tmp_path_factory)[0]["records"][0]["grad_norm"]
    for case in [c for c in CASES if c[0] == "deepspeed"]:
        norm = _run(case, tmp_path_factory)[0]["records"][0]["grad_norm"]
        assert norm == pytest.approx(native, rel=1e-4), (case, norm, native)
