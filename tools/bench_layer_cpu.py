"""Forward + backward time and tokens/s of one MoE layer on CPU, against DeepSpeed's MoE and a GEMM ceiling.

Shape legend: T tokens per rank, H hidden, F expert ffn hidden, E experts, K top-k, e local experts.

EP = ``--ep`` (2) gloo processes with one thread each run
1. our ``MoELayer`` (dropless; rows cross ranks through shared memory, as the two ranks share
   a host; oneDNN expert GEMMs), and, when deepspeed is importable,
2. DeepSpeed's ``deepspeed.moe.layer.MoE`` (``drop_tokens=False``, same shape, a SwiGLU expert,
   its gate loaded with our router's weights: both route every token to the same experts, so
   both carry the same load per rank; ``--independent-routers`` keeps DeepSpeed's own init),
alternating, ``--repeats`` times each; the best tokens/s of each is reported, with all samples.
3. Then, alone, a single-thread fp32 GEMM of one expert's shape ([T*K/e, H] @ [H, F]) as the
   per-process ceiling in GFLOP/s: the better of ``torch.mm`` and oneDNN
   (``moe_dist.ops.cpu_matmul``), both reported.
Both processes switch glibc to keeping freed memory (``moe_dist.training.host_memory``, off with
``--no-retain-memory``), so neither implementation pays page faults the other doesn't. Per row
also the bytes one forward keeps for the backward over what the expert GEMMs need for the rows
the rank's experts receive (``bench_common.gemm_activation_bytes``, fp32), busiest rank.

Prints a table and writes JSON (``--out``); ``bench_layer_cuda.py`` is the GPU counterpart.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.ops.compiled import compile_failures  # noqa: E402
from moe_dist.ops.cpu_matmul import matmul, onednn_status  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.training.host_memory import retain_freed_memory  # noqa: E402
from tools.bench_common import (  # noqa: E402
    add_common_args,
    check_positive,
    finish,
    gemm_activation_bytes,
    kept_bytes,
    layer_flops,
    layer_step,
    our_layer,
)


class SwiGLUExpert(nn.Module):
    """The expert module handed to DeepSpeed: the same maths as our experts."""

    def __init__(self, H: int, Fh: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(H, Fh, bias=False)
        self.w3 = nn.Linear(H, Fh, bias=False)
        self.w2 = nn.Linear(Fh, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _time_steps(step: Callable[[], None], iters: int, warmup: int) -> tuple[float, float]:
    """(wall, CPU) seconds per fwd+bwd, all ranks in lockstep (barriers around the timed loop).

    CPU seconds of this process are reported beside wall time: on a shared machine they are the
    steadier signal (a descheduled process does not accrue them)."""
    for _ in range(warmup):
        step()
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    c1 = time.process_time()
    dist.barrier()
    return (time.perf_counter() - t0) / iters, (c1 - c0) / iters


def _cpu_worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(args.threads)
    # Both implementations run in this process, so both get the same allocator settings.
    allocator_note = retain_freed_memory() if not args.no_retain_memory else "off (--no-retain-memory)"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
        T, H, Fh, E, K = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
        torch.manual_seed(0)
        ours = our_layer(H, Fh, E, K, ParallelGroups.build(world), args.fused_kernels)
        g = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(T, H, generator=g).requires_grad_()
        gy = torch.randn(T, H, generator=g)

        candidates = {"ours": layer_step(ours, x, gy)}
        modules: dict[str, torch.nn.Module] = {"ours": ours}
        ds_error = None
        if not args.no_deepspeed:
            try:
                router_EH = None if args.independent_routers else ours.gate.router.weight
                candidates["deepspeed"], modules["deepspeed"] = _deepspeed_step(
                    x, gy, H, Fh, E, K, world, router_EH
                )
            except Exception as exc:  # noqa: BLE001 - DeepSpeed absent or broken: report, keep ours
                ds_error = f"{type(exc).__name__}: {exc}"
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, step in candidates.items():  # alternate, so machine noise hits both alike
                samples[name].append(_time_steps(step, args.iters, args.warmup))
        # one more forward each (collective: every rank, same order), nothing timed
        saved = {name: kept_bytes(m, x) for name, m in modules.items()}
        ours.gate.received_per_local_expert_e.zero_()
        ours(x)
        received = int(ours.gate.received_per_local_expert_e.sum())  # rows this rank's experts get
        payload = {
            "samples": samples,
            "deepspeed_error": ds_error,
            "allocator": allocator_note,
            "saved_bytes": saved,
            "received_rows": received,
            "compile_failures": compile_failures(),
        }
        queue.put((rank, "ok", payload))
    except BaseException:  # noqa: BLE001
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _deepspeed_step(
    x: torch.Tensor,
    gy: torch.Tensor,
    H: int,
    Fh: int,
    E: int,
    K: int,
    ep: int,
    router_EH: torch.Tensor | None,
) -> tuple[Callable[[], None], torch.nn.Module]:
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    moe = MoE(
        H,
        expert=SwiGLUExpert(H, Fh),
        num_experts=E,
        ep_size=ep,
        k=K,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    moe.set_deepspeed_parallelism()
    if router_EH is not None:  # our router's weights: both layers send every token to the same experts
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(router_EH)

    def step() -> None:
        y, l_aux, _ = moe(x)
        y.backward(gy)

    return step, moe


def gemm_ceiling_cpu(M: int, H: int, Fh: int, threads: int, reps: int = 20) -> dict[str, tuple[float, float]]:
    """GFLOP/s of a single-process fp32 [M, H] @ [H, F] with ``threads`` threads, best of reps,
    as (per wall second, per CPU second), for each kernel torch offers here: ``torch.mm`` (MKL's
    sgemm in the x86 wheels) and oneDNN (``moe_dist.ops.cpu_matmul``, when usable)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(M, H), torch.randn(H, Fh)
    kernels = {"torch.mm": lambda: matmul(a, b, False)}
    if onednn_status() is None:
        kernels["oneDNN"] = lambda: matmul(a, b, True)
    out = {}
    for name, fn in kernels.items():
        fn()
        best, best_cpu = float("inf"), float("inf")
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
        flops = 2.0 * M * H * Fh
        out[name] = (flops / best / 1e9, flops / best_cpu / 1e9)
    return out


def _run_ranks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start ``args.ep`` worker processes and collect each rank's payload."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_cpu_worker, args=(r, args.ep, port, args, queue)) for r in range(args.ep)]
    for p in procs:
        p.start()
    results: list[Any] = [None] * args.ep
    try:
        for _ in range(args.ep):
            rank, status, payload = queue.get(timeout=1800)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    results = _run_ranks(args)
    T, H, Fh, E, K, ep = args.tokens, args.hidden, args.ffn, args.experts, args.top_k, args.ep
    rows = []
    for name in results[0]["samples"]:
        per_iter = [
            max(r["samples"][name][i][0] for r in results) for i in range(args.repeats)
        ]  # slowest rank
        cpu = [max(r["samples"][name][i][1] for r in results) for i in range(args.repeats)]
        best = min(per_iter)
        rows.append(
            {
                "impl": name,
                "ep": ep,
                "seconds_per_step": best,
                "all_seconds": per_iter,
                "tokens_per_s": ep * T / best,
                "gflops_per_process": layer_flops(T, H, Fh, K) / best / 1e9,
                "cpu_seconds_per_step": min(cpu),
                "all_cpu_seconds": cpu,
                "gflops_per_cpu_second": layer_flops(T, H, Fh, K) / min(cpu) / 1e9,
                # kept for the backward, over what the expert GEMMs need for the rows this
                # rank's experts really receive (fp32); busiest rank
                "saved_over_gemm_activations": max(
                    r["saved_bytes"][name] / gemm_activation_bytes(r["received_rows"], H, Fh, 4)
                    for r in results
                ),
            }
        )
    kernels = gemm_ceiling_cpu(T * K * ep // E, H, Fh, args.threads)
    ceiling = max(wall for wall, _ in kernels.values())
    ceiling_cpu = max(cpu for _, cpu in kernels.values())
    for r in rows:
        r["fraction_of_ceiling"] = r["gflops_per_process"] / ceiling
    out = {
        "device": "cpu",
        "shape": {"tokens_per_rank": T, "hidden": H, "ffn": Fh, "experts": E, "top_k": K},
        "threads_per_process": args.threads,
        "rows": rows,
        "gemm_ceiling_gflops": ceiling,
        "gemm_ceiling_gflops_per_cpu_second": ceiling_cpu,
        "gemm_ceiling_by_kernel": {
            k: {"gflops": w, "gflops_per_cpu_second": c} for k, (w, c) in kernels.items()
        },
        "load_average": os.getloadavg(),
        "deepspeed_error": results[0]["deepspeed_error"],
        "retain_freed_memory": results[0]["allocator"] or "on",
        "same_routing": not args.independent_routers,
        "fused_kernels": args.fused_kernels,
        "compile_failures": results[0]["compile_failures"],
    }
    speeds = {r["impl"]: r["tokens_per_s"] for r in rows}
    cpu = {r["impl"]: r["cpu_seconds_per_step"] for r in rows}
    if "deepspeed" in speeds:
        out["speedup_vs_deepspeed"] = speeds["ours"] / speeds["deepspeed"]
        medians = {r["impl"]: sorted(r["all_seconds"])[len(r["all_seconds"]) // 2] for r in rows}
        out["median_speedup_vs_deepspeed"] = medians["deepspeed"] / medians["ours"]
        out["cpu_time_speedup_vs_deepspeed"] = cpu["deepspeed"] / cpu["ours"]
    return out


def print_table(out: dict[str, Any]) -> None:
    s = out["shape"]
    print(
        f"CPU, {out['threads_per_process']} thread(s)/process, T={s['tokens_per_rank']}/rank "
        f"H={s['hidden']} F={s['ffn']} E={s['experts']} K={s['top_k']}"
    )
    print(
        f"{'impl':<12}{'EP':>4}{'s/step':>10}{'tokens/s':>12}{'GFLOP/s/proc':>14}{'CPU s/step':>12}"
        f"{'GFLOP/CPU-s':>13}{'kept/GEMM act':>15}  wall samples (s/step)"
    )
    for r in out["rows"]:
        samples = " ".join(f"{v:.3f}" for v in r["all_seconds"])
        print(
            f"{r['impl']:<12}{r['ep']:>4}{r['seconds_per_step']:>10.3f}{r['tokens_per_s']:>12.0f}"
            f"{r['gflops_per_process']:>14.1f}{r['cpu_seconds_per_step']:>12.3f}"
            f"{r['gflops_per_cpu_second']:>13.1f}{r['saved_over_gemm_activations']:>14.2f}x  {samples}"
        )
    by_kernel = ", ".join(f"{k} {v['gflops']:.1f}" for k, v in out["gemm_ceiling_by_kernel"].items())
    print(
        f"ceiling: {out['threads_per_process']}-thread fp32 GEMM of one expert's shape, best kernel: "
        f"{out['gemm_ceiling_gflops']:.1f} GFLOP/s ({by_kernel}); "
        f"load average {out['load_average'][0]:.1f}"
    )
    print(
        "fraction of the ceiling: "
        + ", ".join(f"{r['impl']} {r['fraction_of_ceiling']:.0%}" for r in out["rows"])
    )
    if "speedup_vs_deepspeed" in out:
        routing = "same routing" if out["same_routing"] else "independent routers"
        print(
            f"ours / deepspeed ({routing}): tokens/s {out['speedup_vs_deepspeed']:.2f}x best, "
            f"{out['median_speedup_vs_deepspeed']:.2f}x median; "
            f"CPU time {out['cpu_time_speedup_vs_deepspeed']:.2f}x"
        )
    if out.get("deepspeed_error"):
        print(f"deepspeed not run: {out['deepspeed_error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, tokens_default=4096, tokens_help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, default=2, help="EP size (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed rounds per implementation")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument(
        "--independent-routers",
        action="store_true",
        help="DeepSpeed's gate keeps its own random init (different routing, different load per rank)",
    )
    p.add_argument(
        "--no-retain-memory", action="store_true", help="leave glibc's allocator as is (host_memory.py)"
    )
    args = p.parse_args(argv)
    positive = ["tokens", "hidden", "ffn", "experts", "top_k", "ep", "threads", "iters", "repeats"]
    check_positive(p, args, positive)
    if args.experts % args.ep:
        p.error(f"--ep ({args.ep}) must divide --experts ({args.experts})")
    if args.top_k > args.experts:
        p.error(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    out = run_cpu(args)
    print_table(out)
    finish(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
