"""Count the device ops of one steady training step: the CPU stand-in for a GPU's kernel launches.

``python tools/step_launches.py CONFIG [--set k=v ...] [--arm NAME] [--top N] [--out FILE.json]``

A small model on a GPU is host-bound: each op is at least one kernel launch of a few microseconds
of host time, and the host, not the device, sets the step time. CPU tests cannot time a launch,
but they can count the ops that would launch: ``OpCounter`` is a ``TorchDispatchMode`` that
counts every aten op that reaches a backend, except views and metadata (``VIEWS``: no kernel on
a GPU either). A ``torch._foreach_*`` op counts once (on a GPU it is a few multi-tensor kernels).
An eager op's count matches the kernels it launches closely but not exactly (a cuBLAS GEMM may
launch two, a CPU op may decompose where CUDA has one fused kernel, e.g. ``rms_norm``). Compiled
code (``model.compile``, ``ops/compiled.py``) runs eagerly under a dispatch mode, so it is counted
as its eager ops: the count is the eager step's, whatever the config compiles.

The step is ``bench_train.py``'s (the native engine as ``moe-dist train`` builds it, EP 1) after
``--warmup`` steps, split by phase: ``forward`` (attributed to the innermost module class
running), ``backward``, ``clip`` (gradient reduction, norm and clip), ``optimizer`` and
``after_step`` (the routers' step hooks). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.config import ConfigError  # noqa: E402
from moe_dist.data.batches import TokenBatches  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.training.native_engine import NativeEngine  # noqa: E402
from moe_dist.training.step_hook import finish_step  # noqa: E402
from tools.bench_train import training_config  # noqa: E402

aten = torch.ops.aten
VIEWS = {
    aten.alias.default, aten.as_strided.default, aten.chunk.default, aten.detach.default,
    aten.expand.default, aten.lift_fresh.default, aten.permute.default, aten.reshape.default,
    aten.select.int, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
    aten.squeeze.default, aten.squeeze.dim, aten.t.default, aten.transpose.int,
    aten.unbind.int, aten.unflatten.int, aten.unsqueeze.default, aten.view.default,
    aten._unsafe_view.default, aten.sym_size.int, aten.sym_numel.default, aten.is_same_size.default,
    aten.promote_types.default, aten.empty.memory_format, aten.empty_like.default,
    aten.empty_strided.default,
}  # fmt: skip
PHASES = ("forward", "backward", "clip", "optimizer", "after_step")


class OpCounter(TorchDispatchMode):
    """Counts non-view aten ops under ``where()``'s label (a phase, or a module in the forward)."""

    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self.where = where
        self.by_where: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in VIEWS:
            self.by_where[self.where()] += 1
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class _Where:
    """The phase of the step, and in the forward the innermost module class running."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.phase = "forward"
        self.modules: list[str] = []
        self.handles = []
        for m in model.modules():
            label = type(m).__name__
            self.handles.append(m.register_forward_pre_hook(lambda mod, a, label=label: self._enter(label)))
            self.handles.append(m.register_forward_hook(lambda mod, a, out: self._leave()))
        self.handles.append(model.register_forward_hook(lambda *a: self._set("backward")))

    def _enter(self, label: str) -> None:
        self.modules.append(label)

    def _leave(self) -> None:
        self.modules.pop()

    def _set(self, phase: str) -> None:
        self.phase = phase

    def __call__(self) -> str:
        if self.phase == "forward" and self.modules:
            return f"forward/{self.modules[-1]}"
        return self.phase

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _step(engine: NativeEngine, batches: TokenBatches, step: int, where: _Where | None) -> None:
    """One optimizer step as ``training/run.py`` runs it (``bench_train._step``), phases marked."""
    mark = where._set if where is not None else (lambda phase: None)
    for micro in range(engine.grad_accum):
        batch = batches.train_batch(step, micro, 0).to(engine.device)
        mark("forward")
        engine.forward_backward(batch.x_BS, batch.y_BS, batch.doc_BS)
    mark("clip")
    norm = engine.clip_grad_norm()
    mark("optimizer")
    engine.step(~torch.isfinite(norm))
    mark("after_step")
    finish_step(engine.model.moe_layers(), engine.groups)


def count_step(config: str, overrides: list[str], warmup: int = 3, arm: str | None = None) -> dict[str, Any]:
    """Ops of one steady step (after ``warmup`` steps): total, per phase, per forward module, per op."""
    cfg = training_config(config, overrides, arm)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    engine = NativeEngine(cfg, ParallelGroups.single(), torch.device("cpu"))
    engine.set_lr(cfg.optim.lr)
    batches = TokenBatches.for_run(cfg)
    for i in range(warmup):
        _step(engine, batches, i, None)
    where = _Where(engine.model)
    counter = OpCounter(where)
    try:
        with counter:
            _step(engine, batches, warmup, where)
    finally:
        where.remove()
    phases = Counter({p: 0 for p in PHASES})
    for label, n in counter.by_where.items():
        phases[label.split("/")[0]] += n
    return {
        "config": config,
        "arm": arm,
        "overrides": overrides,
        "compiled_counted_eager": cfg.model.compile,
        "ops_per_step": sum(counter.by_where.values()),
        "phases": dict(phases),
        "forward_modules": {
            k.split("/", 1)[1]: v for k, v in counter.by_where.most_common() if k.startswith("forward/")
        },
        "ops": dict(counter.by_op.most_common()),
    }


def print_table(out: dict[str, Any], top: int) -> None:
    print(f"{out['config']}: {out['ops_per_step']:,} device ops per steady step (views excluded)")
    if out["compiled_counted_eager"]:
        print("  (model.compile: the compiled blocks are counted as their eager ops)")
    for name, n in out["phases"].items():
        print(f"  {name:<12}{n:8,}")
        if name == "forward":
            for module, m in out["forward_modules"].items():
                print(f"    {module:<24}{m:8,}")
    print("most frequent ops:")
    for name, n in list(out["ops"].items())[:top]:
        print(f"  {n:8,}  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="a training config or a comparison preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--arm", default=None, help="a comparison preset's arm (default: its baseline)")
    p.add_argument("--warmup", type=int, default=3, help="steps before the counted one")
    p.add_argument("--top", type=int, default=20, help="ops to list")
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    overrides = ["run.device=cpu", *args.overrides]
    try:
        out = count_step(args.config, overrides, args.warmup, args.arm)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print_table(out, args.top)
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
