"""Forward + backward time and tokens/s of one MoE layer vs DeepSpeed / Megatron-Core and a GEMM ceiling.

Shape legend: T tokens per rank, H hidden, F expert ffn hidden, E experts, K top-k, e local experts.

``--device cpu`` (default): EP = ``--ep`` (2) gloo processes with one thread each run
1. our ``MoELayer`` (dropless; rows cross ranks through shared memory, as the two ranks share
   a host; oneDNN expert GEMMs), and, when deepspeed is importable,
2. DeepSpeed's ``deepspeed.moe.layer.MoE`` (``drop_tokens=False``, same shape, a SwiGLU expert,
   its gate loaded with our router's weights: both route every token to the same experts, so
   both carry the same load per rank; ``--independent-routers`` keeps DeepSpeed's own init),
alternating, ``--repeats`` times each; the best tokens/s of each is reported, with all samples.
Then, alone, a single-thread fp32 GEMM of one expert's shape ([T*K/e, H] @ [H, F]) as the
per-process ceiling in GFLOP/s: the better of ``torch.mm`` and oneDNN (``moe_dist.ops.cpu_matmul``),
both reported. Both processes switch glibc to keeping freed memory (``moe_dist.training.host_memory``,
off with ``--no-retain-memory``), so neither implementation pays page faults the other doesn't.

``--device cuda``: one GPU (EP = 1), bf16, the shapes Mixtral-like (H 4096, F 14336, E 8, K 2),
Qwen3-like (H 2048, F 768, E 128, K 8), DeepSeek-like (H 2048, F 1408, E 64, K 6) at 8192
tokens; our layer and, when importable, Megatron-Core's MoELayer; the ceiling is a plain bf16
8192^3 GEMM. FLOPs of a forward + backward: ``3 * (4*T*K*H*F + 2*T*K*F*H)`` (SwiGLU experts).
Per row also: the peak memory one step allocates and the bytes its forward keeps for the backward
(``moe_dist.activation_memory``), each over the activations the expert GEMMs need (rows [T*K, H]
and two pre-activations [T*K, F], bf16; the peak also holds the weight gradients' buffers before
they are accumulated), and for our layer the share of the step
that is not the experts (router, dispatch, combine: the step minus the experts alone on the
rows one dispatch gives them).

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.activation_memory import saved_for_backward  # noqa: E402
from moe_dist.config import MoEConfig  # noqa: E402
from moe_dist.layers.moe_layer import MoELayer  # noqa: E402
from moe_dist.ops.compiled import compile_failures  # noqa: E402
from moe_dist.ops.cpu_matmul import matmul, onednn_status  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.training.host_memory import retain_freed_memory  # noqa: E402

CUDA_SHAPES = {
    "mixtral-like": {"hidden": 4096, "ffn": 14336, "experts": 8, "top_k": 2},
    "qwen3-like": {"hidden": 2048, "ffn": 768, "experts": 128, "top_k": 8},
    "deepseek-like": {"hidden": 2048, "ffn": 1408, "experts": 64, "top_k": 6},
}


def layer_flops(T: int, H: int, Fh: int, K: int) -> float:
    """Forward + backward FLOPs of the SwiGLU experts for T tokens (router and combine excluded)."""
    return 3.0 * (4 * T * K * H * Fh + 2 * T * K * Fh * H)


def our_layer(
    H: int, Fh: int, E: int, K: int, groups: ParallelGroups, fused_kernels: str = "auto"
) -> MoELayer:
    cfg = MoEConfig(
        num_experts=E,
        router={"name": "topk_softmax", "top_k": K},
        experts={"ffn_hidden_size": Fh, "activation": "swiglu"},
        fused_kernels=fused_kernels,
    )
    return MoELayer(cfg, H, groups)


class SwiGLUExpert(nn.Module):
    """The expert module handed to DeepSpeed / Megatron: the same maths as our experts."""

    def __init__(self, H: int, Fh: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(H, Fh, bias=False)
        self.w3 = nn.Linear(H, Fh, bias=False)
        self.w2 = nn.Linear(Fh, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ---------------------------------------------------------------- CPU: EP on gloo processes


def _time_steps(step: Any, iters: int, warmup: int) -> tuple[float, float]:
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

        def ours_step() -> None:
            y, _ = ours(x)
            y.backward(gy)

        candidates = {"ours": ours_step}
        modules: dict[str, torch.nn.Module] = {"ours": ours}
        ds_error = None
        if not args.no_deepspeed:
            try:
                router_EH = None if args.independent_routers else ours.router.weight
                candidates["deepspeed"], modules["deepspeed"] = _deepspeed_step(
                    x, gy, H, Fh, E, K, world, router_EH
                )
            except Exception as exc:  # noqa: BLE001 - DeepSpeed absent or broken: report, keep ours
                ds_error = f"{type(exc).__name__}: {exc}"
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, step in candidates.items():  # alternate, so machine noise hits both alike
                samples[name].append(_time_steps(step, args.iters, args.warmup))
        saved = {  # one more forward each (collective: every rank, same order), nothing timed
            name: saved_for_backward(lambda m=m: m(x), [*m.parameters(), x])[0] for name, m in modules.items()
        }
        ours.received_per_local_expert_e.zero_()
        ours(x)
        received = int(ours.received_per_local_expert_e.sum())  # rows this rank's experts get
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
) -> Any:
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


def run_cpu(args: argparse.Namespace) -> dict:
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
                # rank's experts really receive ([rows, H] + 2 x [rows, F], fp32); busiest rank
                "saved_over_gemm_activations": max(
                    r["saved_bytes"][name] / (r["received_rows"] * (H + 2 * Fh) * 4) for r in results
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


# ---------------------------------------------------------------- CUDA: one GPU, bf16


def _cuda_time(step: Any, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def _megatron_step(x: torch.Tensor, gy: torch.Tensor, H: int, Fh: int, E: int, K: int) -> Any:
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)  # expert init draws from Megatron's tracked CUDA RNG
    try:
        import transformer_engine  # noqa: F401

        use_te = True
    except ImportError:
        use_te = False
    config = TransformerConfig(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=8,
        ffn_hidden_size=Fh,
        moe_ffn_hidden_size=Fh,
        num_moe_experts=E,
        moe_router_topk=K,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )
    spec = get_moe_module_spec(use_te=use_te, num_experts=E, moe_grouped_gemm=use_te)
    moe = build_module(spec, config=config).cuda()
    x_SBH = x.detach().view(-1, 1, H).requires_grad_()
    gy_SBH = gy.view(-1, 1, H)

    def step() -> None:
        y, _ = moe(x_SBH)
        y.backward(gy_SBH)

    def saved() -> int:
        return saved_for_backward(lambda: moe(x_SBH), [*moe.parameters(), x_SBH])[0]

    return step, ("TE grouped GEMM" if use_te else "local SequentialMLP"), saved


def run_cuda(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench_layer: --device cuda needs a CUDA GPU; none is visible")
    dev = torch.device("cuda")
    N = 8192
    a, b = (
        torch.randn(N, N, device=dev, dtype=torch.bfloat16),
        torch.randn(N, N, device=dev, dtype=torch.bfloat16),
    )
    ceiling = 2.0 * N**3 / _cuda_time(lambda: torch.mm(a, b), args.iters, args.warmup) / 1e12
    a = b = torch.empty(0)  # free the GEMM operands
    rows = []
    T = args.tokens if args.tokens_set else 8192
    for shape_name, s in CUDA_SHAPES.items():
        H, Fh, E, K = s["hidden"], s["ffn"], s["experts"], s["top_k"]
        torch.manual_seed(0)
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16).requires_grad_()
        gy = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        groups = ParallelGroups.single()
        layer = our_layer(H, Fh, E, K, groups, args.fused_kernels).to(device=dev, dtype=torch.bfloat16)
        note = "grouped_mm" if layer.experts.use_grouped_mm(x) else "per-expert loop"
        impls: dict[str, Any] = {"ours": (*_layer_step(layer, x, gy), note)}
        try:
            impls["megatron-core"] = _megatron_step(x, gy, H, Fh, E, K)
        except Exception as exc:  # noqa: BLE001 - not importable or not buildable here: report it
            rows.append(
                {"shape": shape_name, "impl": "megatron-core", "error": f"{type(exc).__name__}: {exc}"}
            )
        # The activations the expert GEMMs keep for the backward: the dispatched rows [T*K, H]
        # and the two pre-activations [T*K, F] that SwiGLU's derivative needs (bf16).
        gemm_activation_bytes = T * K * (H + 2 * Fh) * 2
        for name, impl in impls.items():
            step, note, saved = (impl[0], impl[2], impl[1]) if name == "ours" else impl
            try:
                secs = _cuda_time(step, args.iters, args.warmup)
                peak = _cuda_peak_bytes(step)
                saved_bytes = saved()
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report, go on to the next
                rows.append({"shape": shape_name, "impl": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            tflops = layer_flops(T, H, Fh, K) / secs / 1e12
            row = {
                "shape": shape_name,
                "impl": name,
                "note": note,
                "tokens": T,
                "seconds_per_step": secs,
                "tokens_per_s": T / secs,
                "tflops": tflops,
                "fraction_of_gemm": tflops / ceiling,
                "peak_step_bytes": peak,
                "peak_over_gemm_activations": peak / gemm_activation_bytes,
                "saved_for_backward_bytes": saved_bytes,
                "saved_over_gemm_activations": saved_bytes / gemm_activation_bytes,
            }
            if name == "ours":  # router + dispatch + combine: the layer minus its experts alone
                experts_secs = _cuda_time(_experts_step(layer, x), args.iters, args.warmup)
                row["routing_overhead_fraction"] = 1.0 - experts_secs / secs
            rows.append(row)
        del layer, impls, x, gy
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "gemm_ceiling_tflops": ceiling,
        "rows": rows,
        "fused_kernels": args.fused_kernels,
        "compile_failures": compile_failures(),
    }


def _cuda_peak_bytes(step: Any) -> int:
    """Memory one forward + backward allocates above what was live before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _experts_step(layer: MoELayer, x: torch.Tensor) -> Any:
    """Forward + backward of the layer's experts alone, on the rows (and routing weights) one
    dispatch gives them."""
    with torch.no_grad():
        routing = layer.router(x)
        rows_YH, counts_e, ctx = layer.dispatcher.dispatch(x, routing)
    rows_YH = rows_YH.detach().requires_grad_()
    w_Y = ctx.row_weights_Y.detach().requires_grad_()
    gy_YH = torch.randn_like(rows_YH)

    def step() -> None:
        layer.experts(rows_YH, counts_e, w_Y).backward(gy_YH)

    return step


def _layer_step(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor) -> tuple[Any, Any]:
    def step() -> None:
        y, _ = layer(x)
        y.backward(gy)

    def saved() -> int:
        return saved_for_backward(lambda: layer(x), [*layer.parameters(), x])[0]

    return step, saved


# ---------------------------------------------------------------- CLI


def print_table(out: dict) -> None:
    if out["device"] == "cpu":
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
    else:
        print(f"{out['device']}, bf16 GEMM ceiling {out['gemm_ceiling_tflops']:.0f} TFLOP/s")
        for r in out["rows"]:
            if "error" in r:
                print(f"{r['shape']:<15}{r['impl']:<15} not run: {r['error']}")
            else:
                overhead = r.get("routing_overhead_fraction")
                print(
                    f"{r['shape']:<15}{r['impl']:<15}{r['seconds_per_step'] * 1e3:>9.2f} ms"
                    f"{r['tokens_per_s']:>12.0f} tok/s"
                    f"{r['tflops']:>8.1f} TFLOP/s ({r['fraction_of_gemm']:.0%} of GEMM)"
                    f"  peak {r['peak_step_bytes'] / 2**20:,.0f} MiB"
                    f" ({r['peak_over_gemm_activations']:.2f}x GEMM activations,"
                    f" {r['saved_over_gemm_activations']:.2f}x kept for the backward)"
                    + (f"  routing {overhead:.0%} of the step" if overhead is not None else "")
                    + f"  {r['note']}"
                )

    if out.get("compile_failures"):
        print(f"fused activation fell back to eager: {out['compile_failures']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (cpu default 4096, cuda 8192)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, default=2, help="EP size on cpu (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating timed rounds per implementation (cpu)")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument(
        "--fused-kernels",
        choices=["auto", "compiled", "eager"],
        default="auto",
        help="our layer's memory-bound kernels (moe_dist/ops/compiled.py; auto: compiled on CUDA)",
    )
    p.add_argument(
        "--independent-routers",
        action="store_true",
        help="DeepSpeed's gate keeps its own random init (different routing, different load per rank)",
    )
    p.add_argument(
        "--no-retain-memory", action="store_true", help="leave glibc's allocator as is (host_memory.py)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.tokens_set = args.tokens is not None
    args.tokens = args.tokens if args.tokens is not None else (4096 if args.device == "cpu" else 8192)
    for name in ("tokens", "hidden", "ffn", "experts", "top_k", "ep", "threads", "iters", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.device == "cpu" and args.experts % args.ep:
        p.error(f"--ep ({args.ep}) must divide --experts ({args.experts})")
    if args.top_k > args.experts:
        p.error(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    out = run_cpu(args) if args.device == "cpu" else run_cuda(args)
    print_table(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
