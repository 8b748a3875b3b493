"""Per-step cost of the TensorBoard and W&B loggers on the demo-sized model: each logger vs off.

    python tools/bench_loggers.py [--config configs/demo.yaml] [--rounds 4] [--steps 10]
                                  [--json docs/results/bench_loggers.json]

One process, EP 1, one thread, real training steps (forward, backward, AdamW, ``finish_step``),
each followed by what the trainer does after it: the metrics.jsonl record (with the per-layer
load statistics) and, for a logger mode, ``GuardedLoggers.write(record)``. All three modes live in
one process, opened once; rounds alternate the order of off / tensorboard / wandb (offline, no
network) so drift and other load on the machine hit every mode alike. Reported per mode:

- step time, median, and its overhead against off (noisy on a shared machine);
- the direct cost of ``write`` on the training thread (mean and p99 wall time, its share of the
  median off step, and its thread CPU time): the number to hold against the < 1 % target; since
  the loggers run on a background thread this is the queueing only;
- background CPU per step: the process's other threads (the loggers' thread: the tag mapping,
  TensorBoard's protobufs and event writer, W&B's ``run.log``) and child processes (W&B's
  ``wandb-core``), which compete for cores but do not hold up the training thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_dist.config import load_config  # noqa: E402
from moe_dist.models import build_model  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.training.loggers import GuardedLoggers  # noqa: E402
from moe_dist.training.step_hook import finish_step  # noqa: E402
from moe_dist.training.summary import layer_record  # noqa: E402
from moe_dist.training.utilization import peak_memory_bytes  # noqa: E402

MODES = ("off", "tensorboard", "wandb")


def children_cpu_seconds() -> float:
    """utime + stime of this process's child processes (W&B's service), from /proc."""
    total, tick, me = 0.0, os.sysconf("SC_CLK_TCK"), os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def open_mode(mode: str, where: Path, config: dict[str, Any]) -> GuardedLoggers | None:
    if mode == "tensorboard":
        from moe_dist.training.loggers.tensorboard import TensorBoardLogger

        return GuardedLoggers([TensorBoardLogger(where / "tensorboard")])
    if mode == "wandb":
        from moe_dist.training.loggers.wandb import WandbLogger

        return GuardedLoggers([WandbLogger(where, "offline", "bench", "bench", config)])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="steps per round and mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bench_loggers.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loggers_"))
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp))

    cfg = load_config(args.config, ["parallel.ep_size=1"])
    groups = ParallelGroups.single()
    model = build_model(cfg.model, groups, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, S, V = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
    loggers = {m: open_mode(m, tmp / m, cfg.model_dump(mode="json")) for m in MODES}
    step = 0

    def run(mode: str, n: int, out: dict[str, list[float]]) -> None:
        nonlocal step
        handle = loggers[mode]
        p0, c0, k0 = time.process_time(), time.thread_time(), children_cpu_seconds()
        for _ in range(n):
            step += 1
            t0 = time.perf_counter()
            x_BS = torch.randint(0, V, (B, S + 1), generator=gen)
            logits, aux_loss, aux = model(x_BS[:, :-1])
            task = F.cross_entropy(logits.flatten(0, 1), x_BS[:, 1:].flatten())
            (task + aux_loss).backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            opt.step()
            opt.zero_grad(set_to_none=True)
            counts = finish_step(model.moe_layers(), groups)
            seconds = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": float(task.detach()),
                "aux": {k: float(v.detach()) for k, v in aux.items()},
                "lr": 1e-3,
                "grad_norm": grad_norm,
                "tokens": step * B * S,
                "tokens_per_s": B * S / seconds,
                "step_seconds": seconds,
                "skipped": False,
                "peak_memory_bytes": [peak_memory_bytes(torch.device("cpu"))],
                "layers": [layer_record(b, c.float(), 0.0) for b, c in zip(moe_blocks, counts.counts_E)],
            }
            json.dumps(record)  # what metrics.jsonl costs, in every mode
            t1, w1 = time.perf_counter(), time.thread_time()
            if handle is not None:
                handle.write(record)
            t2, w2 = time.perf_counter(), time.thread_time()
            out["step"].append(t2 - t0)
            out["write"].append(t2 - t1)
            out["write_cpu"].append(w2 - w1)
        thread = time.thread_time() - c0
        out["background_cpu"].append((time.process_time() - p0 - thread + children_cpu_seconds() - k0) / n)

    scratch: dict[str, list[float]] = {"step": [], "write": [], "write_cpu": [], "background_cpu": []}
    for mode in MODES:
        run(mode, args.warmup, scratch)
    res = {m: {"step": [], "write": [], "write_cpu": [], "background_cpu": []} for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        for mode in order if r % 2 == 0 else tuple(reversed(order)):
            run(mode, args.steps, res[mode])
    for handle in loggers.values():
        if handle is not None:
            handle.close()

    med_off = statistics.median(res["off"]["step"])
    rows = {}
    for mode in MODES:
        w = sorted(res[mode]["write"])
        med = statistics.median(res[mode]["step"])
        rows[mode] = {
            "step_median_ms": 1e3 * med,
            "step_overhead_pct": 100 * (med / med_off - 1),
            "write_mean_ms": 1e3 * statistics.fmean(w),
            "write_p99_ms": 1e3 * w[max(0, int(0.99 * len(w)) - 1)],
            "write_share_of_step_pct": 100 * statistics.fmean(w) / med_off,
            "write_cpu_mean_ms": 1e3 * statistics.fmean(res[mode]["write_cpu"]),
            "background_cpu_ms_per_step": 1e3 * statistics.fmean(res[mode]["background_cpu"]),
        }
    result = {
        "model": {
            "config": str(Path(args.config).name),
            "dim": cfg.model.dim,
            "n_layers": cfg.model.n_layers,
            "experts": cfg.model.moe.num_experts,
            "tokens_per_step": B * S,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "modes": rows,
    }
    print(
        f"{'mode':<12} {'step ms':>8} {'vs off':>8} {'write ms':>9} {'p99 ms':>8}"
        f" {'write/step':>10} {'write CPU ms':>12} {'bg CPU ms':>9}"
    )
    for mode, row in rows.items():
        print(
            f"{mode:<12} {row['step_median_ms']:>8.1f} {row['step_overhead_pct']:>7.2f}% "
            f"{row['write_mean_ms']:>9.3f} {row['write_p99_ms']:>8.3f}"
            f" {row['write_share_of_step_pct']:>9.3f}% {row['write_cpu_mean_ms']:>12.3f} "
            f"{row['background_cpu_ms_per_step']:>9.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
