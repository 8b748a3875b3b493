"""Data parallelism of the native engine: memory per rank, step time, and how long a save blocks the loop.

Usage: ``python tools/bench_fsdp.py [--steps 6] [--json docs/results/bench_fsdp.json]``

Every measurement runs the real ``NativeEngine`` on real gloo processes (CPU), on the demo model
(configs/demo.yaml) and on a ~10x larger one (``LARGE``: wider and deeper):

1. Memory per rank after one optimizer step: the bytes this rank holds in parameters, gradients
   (just before they are dropped) and AdamW state, for world 1, 2 and 4 (DP x EP layouts),
   ``replicate`` vs ``fsdp`` (fsdp needs 2 or more ranks). Under fsdp the dense part and the
   expert part both fall as 1 / (ranks sharing them).
2. Step time on 2 ranks, replicate vs fsdp: the median of ``--steps`` steps after one warm-up.
3. The time ``engine.save`` blocks the loop (a training step between saves): synchronous DCP vs
   ``checkpoint.async: true`` (the copy of the state, and any wait for the previous write).

Prints a table, writes JSON. Figures depend on the machine; none are quoted in docstrings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_dist.config import apply_overrides, config_from_dict, read_yaml  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.training.fsdp import local as _local  # noqa: E402
from moe_dist.training.native_engine import NativeEngine  # noqa: E402

LARGE = ("model.dim=320", "model.n_layers=6", "model.moe.experts.ffn_hidden_size=640")
LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]  # (world, EP)


def _config(overrides: list[str], out_dir: str) -> Any:
    data = read_yaml(ROOT / "configs" / "demo.yaml")
    errors = apply_overrides(data, [f"run.out_dir={json.dumps(out_dir)}", "run.threads=1", *overrides])
    assert not errors, errors
    return config_from_dict(data)


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _body(
    rank: int, world: int, port: int, overrides: list[str], steps: int, out_dir: str, queue: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    cfg = _config(overrides, out_dir)
    groups = ParallelGroups.build(cfg.parallel.ep_size, "collective")
    engine = NativeEngine(cfg, groups, torch.device("cpu"))
    B, S, V = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(rank)
    times, memory = [], {}

    def train_step(first: bool) -> None:
        x_BS = torch.randint(0, V, (B, S), generator=gen)
        t0 = time.perf_counter()
        engine.forward_backward(x_BS, x_BS.roll(-1, 1), None)
        engine.clip_grad_norm()
        params = list(engine.model.parameters())
        if first:
            memory["params"] = _bytes(params)
            memory["grads"] = _bytes([p.grad for p in params if p.grad is not None])
        engine.step()
        times.append(time.perf_counter() - t0)

    for step in range(steps + 1):
        train_step(step == 0)
    memory["optim"] = _bytes(
        [v for st in engine.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    )
    save_s = []
    if cfg.checkpoint.resolved_format(cfg.parallel.data_parallel) == "dcp":
        for i in range(3):
            t0 = time.perf_counter()
            engine.save(Path(out_dir) / "ckpt", i + 1, {}, keep=1)
            save_s.append(time.perf_counter() - t0)
            train_step(False)  # a step between saves, as in a run: time for a background write
        engine.wait_saves(complete=True)
    queue.put((rank, {"memory": memory, "step_s": statistics.median(times[1 : steps + 1]), "save_s": save_s}))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, overrides: list[str], steps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as out_dir:
        import socket  # noqa: PLC0415

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            ctx.Process(target=_body, args=(r, world, port, overrides, steps, out_dir, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    return results[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bench_fsdp.json")
    args = ap.parse_args()
    out: dict[str, Any] = {"memory": [], "step_time": []}
    print(
        f"{'model':6} {'world':>5} {'EP':>3} {'mode':10} {'params MB':>10} {'grads MB':>9}"
        f" {'optim MB':>9} {'total MB':>9}"
    )
    for model, extra in (("demo", ()), ("large", LARGE)):
        for world, ep in LAYOUTS:
            for mode in ("replicate", "fsdp"):
                if mode == "fsdp" and world == 1:
                    continue
                ov = [
                    *extra,
                    f"parallel.ep_size={ep}",
                    f"parallel.data_parallel={mode}",
                    "parallel.backend=gloo",
                ]
                r = run(world, ov, 1)
                m = {k: v / 2**20 for k, v in r["memory"].items()}
                total = sum(m.values())
                out["memory"].append(
                    {"model": model, "world": world, "ep": ep, "mode": mode, **m, "total": total}
                )
                print(
                    f"{model:6} {world:5} {ep:3} {mode:10} {m['params']:10.2f} {m['grads']:9.2f}"
                    f" {m['optim']:9.2f} {total:9.2f}"
                )
    print(f"\n{'model':6} {'mode':10} {'step s (2 ranks, EP 2)':>24} {'save blocks s':>14}")
    for model, extra in (("demo", ()), ("large", LARGE)):
        for mode, asynchronous in (("replicate", False), ("fsdp", False), ("fsdp", True)):
            ov = [*extra, "parallel.ep_size=2", f"parallel.data_parallel={mode}", "parallel.backend=gloo"]
            ov += ["checkpoint.format=dcp", f"checkpoint.async={str(asynchronous).lower()}"]
            r = run(2, ov, args.steps)
            save = statistics.median(r["save_s"])
            name = f"{mode}{' async' if asynchronous else ''}"
            out["step_time"].append(
                {"model": model, "mode": name, "step_s": r["step_s"], "save_blocking_s": save}
            )
            print(f"{model:6} {name:10} {r['step_s']:24.4f} {save:14.4f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
