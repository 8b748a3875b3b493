"""Training throughput of a named config on one device: tokens/s, MFU, peak memory, a per-step breakdown.

``python tools/bench_train.py CONFIG [--set k=v ...] [--arm NAME] [--steps N] [--out FILE.json]``

CONFIG is a training config or a comparison preset (``configs/compare/*.yaml``: its baseline arm,
or ``--arm``, on the preset's model).

One process (EP = 1, DP = 1), the native engine exactly as ``moe-dist train`` builds it (model,
``run.precision``, fused AdamW, gradient reduction and clipping, step hook), on the config's own
data:

1. ``--warmup`` steps (compilation, allocator growth), then ``--steps`` timed steps between two
   device synchronisations: tokens/s, MFU (``training/utilization.py``'s formula and peak table,
   CUDA only), peak memory.
2. Breakdown, from events recorded inside the timed steps (CUDA events on a GPU: no sync;
   the host clock on CPU): forward, backward, gradient reduction + clip, optimizer + step hook.
3. ``--profile-steps`` more steps under ``torch.profiler`` (``step_profile.py``): device
   busy time (the union of all kernel intervals) against the steps' wall span (the rest is the
   host gaps, where the GPU waited for Python), the kernels that take the time and the host ops
   that take the host's.

Prints a table and writes JSON. On CPU it is the smoke test CI runs (a few steps, small config).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.compare.presets import split_compare_file  # noqa: E402
from moe_dist.compare.variants import apply_variant  # noqa: E402
from moe_dist.config import (  # noqa: E402
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    read_yaml,
)
from moe_dist.data.batches import TokenBatches  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.training.native_engine import NativeEngine  # noqa: E402
from moe_dist.training.run import pick_device  # noqa: E402
from moe_dist.training.step_hook import finish_step  # noqa: E402
from moe_dist.training.utilization import flops_per_token, peak_memory_bytes, peak_tflops_for  # noqa: E402
from tools.step_profile import print_profile, profile_steps  # noqa: E402

PHASES = ("forward", "backward", "reduce_clip", "optimizer")


class Marks:
    """Timestamps inside a step: CUDA events (read after a sync) or the host clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase name, each interval ending at its mark, summed over the steps."""
        out = dict.fromkeys(PHASES, 0.0)
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            if name in out:
                out[name] += a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return out


def _step(engine: NativeEngine, batches: TokenBatches, step: int, marks: Marks | None) -> None:
    """One optimizer step as ``training/run.py`` runs it, with marks between the phases."""
    cfg_ga = engine.grad_accum
    mark = marks.mark if marks is not None else (lambda name: None)
    mark("start")
    hook = engine.model.register_forward_hook(lambda *_: mark("forward"))
    try:
        for micro in range(cfg_ga):
            batch = batches.train_batch(step, micro, 0).to(engine.device)
            engine.forward_backward(batch.x_BS, batch.y_BS, batch.doc_BS)
            mark("backward")
    finally:
        hook.remove()
    norm = engine.clip_grad_norm()
    mark("reduce_clip")
    engine.step(~torch.isfinite(norm))
    finish_step(engine.model.moe_layers(), engine.groups)
    mark("optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_config(path: str, overrides: list[str], arm: str | None) -> Config:
    """The config of ``path``, one process; a comparison preset gives its baseline arm (or ``arm``)."""
    sets = ["parallel.ep_size=1", "parallel.data_parallel=replicate", *overrides]
    if "compare" not in read_yaml(path):
        return load_config(path, sets, world_size=1)
    base, section = split_compare_file(path)
    name = arm or section.baseline or next(iter(section.arms), None)
    variants = section.variants()
    if name not in variants:
        raise ConfigError([f"--arm: {name!r} is not an arm of the preset ({', '.join(variants)})"], path)
    data = apply_variant(base, variants[name])
    errors = apply_overrides(data, [*variants[name].overrides, *sets])
    if errors:
        raise ConfigError(errors, path)
    return config_from_dict(data, path, 1)


def bench(
    config: str, overrides: list[str], steps: int, warmup: int, profile_steps_n: int, arm: str | None = None
) -> dict[str, Any]:
    cfg = training_config(config, overrides, arm)
    device = pick_device(cfg.run.device, 0)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    groups = ParallelGroups.single()
    batches = TokenBatches.for_run(cfg)
    engine = NativeEngine(cfg, groups, device)
    engine.set_lr(cfg.optim.lr)
    for i in range(warmup):
        _step(engine, batches, i, None)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = Marks(device)
    t0 = time.perf_counter()
    for i in range(steps):
        _step(engine, batches, warmup + i, marks)
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    tokens = cfg.data.grad_accum * cfg.data.micro_batch_size * cfg.data.seq_len
    out: dict[str, Any] = {
        "config": config,
        "arm": arm,
        "overrides": overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": engine.precision_text(),
        "parameters": engine.counted,
        "tokens_per_step": tokens,
        "steps": steps,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": peak_memory_bytes(device),
        "breakdown_s": {k: v / steps for k, v in marks.seconds().items()},
    }
    if device.type == "cuda":
        peak = cfg.run.peak_tflops or peak_tflops_for(out["device"])
        if peak:
            out["mfu"] = flops_per_token(engine.model, cfg) * out["tokens_per_s"] / (peak * 1e12)
    if profile_steps_n:
        counter = iter(range(10**9))
        out["profiled"] = profile_steps(
            lambda: _step(engine, batches, warmup + steps + next(counter), None), profile_steps_n
        )
    return out


def print_table(out: dict[str, Any]) -> None:
    n = out["parameters"]
    print(
        f"{out['config']} on {out['device']} (torch {out['torch']}), {out['precision']}, "
        f"{n['total'] / 1e6:,.0f}M parameters ({n['expert'] / 1e6:,.0f}M in experts)"
    )
    line = f"{out['tokens_per_s']:>12,.0f} tok/s  {out['seconds_per_step'] * 1e3:8.1f} ms/step"
    if "mfu" in out:
        line += f"  MFU {100 * out['mfu']:.1f}%"
    print(line + f"  peak memory {out['peak_memory_bytes'] / 2**30:.2f} GiB")
    total = sum(out["breakdown_s"].values()) or 1.0
    for name, sec in out["breakdown_s"].items():
        print(f"  {name:<12}{sec * 1e3:9.2f} ms  {sec / total:6.1%}")
    if "profiled" in out:
        print_profile(out["profiled"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="a training config, e.g. configs/models/mixtral_gpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--arm", default=None, help="a comparison preset's arm (default: its baseline)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument(
        "--profile-steps", type=int, default=3, help="profiled steps: host gaps, top kernels and host ops"
    )
    p.add_argument("--out", type=Path, default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        p.error("--steps must be >= 1, --warmup and --profile-steps >= 0")
    try:
        out = bench(args.config, args.overrides, args.steps, args.warmup, args.profile_steps, args.arm)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print_table(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
