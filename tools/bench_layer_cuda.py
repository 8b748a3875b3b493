"""Forward + backward time and tokens/s of one MoE layer on one GPU, against Megatron-Core and a bf16 GEMM.

Shape legend: T tokens, H hidden, F expert ffn hidden, E experts, K top-k; S, B Megatron's
sequence and batch axes (S = T, B = 1).

EP = 1, bf16, ``--tokens`` (8192) tokens, for each of the shapes in ``CUDA_SHAPES``: Mixtral-like
(H 4096, F 14336, E 8, K 2), Qwen3-like (H 2048, F 768, E 128, K 8), DeepSeek-like (H 2048,
F 1408, E 64, K 6):
1. the ceiling first, alone: a plain bf16 8192^3 GEMM, in TFLOP/s;
2. our layer (``grouped_mm`` experts where they work, else the per-expert loop: the row says
   which) and, when importable, Megatron-Core's MoELayer (alltoall dispatcher, TE grouped GEMM
   when transformer_engine is there), each timed with CUDA events; FLOPs as
   ``bench_common.layer_flops``;
3. per row the peak memory one step allocates and the bytes its forward keeps for the backward
   (``moe_dist.activation_memory``), each over the activations the expert GEMMs need (rows
   [T*K, H] and two pre-activations [T*K, F], bf16; the peak also holds the weight gradients);
4. for our layer the share of the step that is not the experts (router, dispatch, combine: the
   step minus the experts alone on the rows and routing weights one dispatch gives them).
Each timed step starts with no gradients, as a training step with one micro-batch does (the
optimizer's ``zero_grad(set_to_none=True)``), so the backward writes them rather than adding to
them. ``--accumulate-grads`` keeps them across steps instead: issue 24's figures were measured
that way, and at Qwen3-like shapes the adds into the experts' weight gradients (six bf16 ``add``
kernels) took 0.87 of 7.24 ms per step on the H200 of 2026-12-04. The JSON says which (``grads``).
An implementation that fails (not importable, out of memory) gets a row with its error.
``--profile N`` adds, for our layer, N profiled steps: its kernels by device time and the host
ops (``step_profile.py``); ``--only-ours`` leaves Megatron-Core out.

Prints a table and writes JSON (``--out``); ``bench_layer_cpu.py`` is the CPU counterpart.
Without a visible CUDA GPU it exits with a message (``--help`` works anywhere).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_dist.layers.moe_layer import MoELayer  # noqa: E402
from moe_dist.ops.compiled import compile_failures  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
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
from tools.step_profile import print_profile, profile_steps  # noqa: E402

CUDA_SHAPES = {
    "mixtral-like": {"hidden": 4096, "ffn": 14336, "experts": 8, "top_k": 2},
    "qwen3-like": {"hidden": 2048, "ffn": 768, "experts": 128, "top_k": 8},
    "deepseek-like": {"hidden": 2048, "ffn": 1408, "experts": 64, "top_k": 6},
}

# An implementation under test: its step, a note for the table, and its kept-bytes count.
Impl = tuple[Callable[[], None], str, Callable[[], int]]


def fresh_grads(
    step: Callable[[], None], tensors: list[torch.Tensor], keep: bool = False
) -> Callable[[], None]:
    """``step`` with every tensor's gradient dropped first, so its backward writes fresh ones
    (``keep``: ``step`` itself, its gradients accumulating across calls)."""
    if keep:
        return step

    def fresh_step() -> None:
        for t in tensors:
            t.grad = None
        step()

    return fresh_step


def _cuda_time(step: Callable[[], None], iters: int, warmup: int) -> float:
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


def _cuda_peak_bytes(step: Callable[[], None]) -> int:
    """Memory one forward + backward allocates above what was live before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _megatron_impl(
    x: torch.Tensor, gy: torch.Tensor, H: int, Fh: int, E: int, K: int, accumulate: bool
) -> Impl:
    """Megatron-Core's own MoELayer (its router), from the MoE submodules of its GPT layer spec:
    ``get_moe_module_spec`` changed form in 0.19 (a ``functools.partial``; calling ``.module`` on
    it fails), so the submodules are taken from the layer spec as our adapter does
    (``moe_submodules``), which works on 0.16 and 0.19."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_dist.integrations.megatron import moe_submodules

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
    make = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        if use_te
        else gpt_layer_specs.get_gpt_layer_local_spec
    )
    mlp_spec = make(num_experts=E, moe_grouped_gemm=use_te).submodules.mlp
    moe = MegatronMoELayer(config, moe_submodules(mlp_spec), layer_number=1).cuda()
    x_SBH = x.detach().view(-1, 1, H).requires_grad_()
    gy_SBH = gy.view(-1, 1, H)

    def step() -> None:
        y, _ = moe(x_SBH)
        y.backward(gy_SBH)

    note = "TE grouped GEMM" if use_te else "local SequentialMLP"
    return fresh_grads(step, [x_SBH, *moe.parameters()], accumulate), note, lambda: kept_bytes(moe, x_SBH)


def _experts_step(layer: MoELayer, x: torch.Tensor, accumulate: bool) -> Callable[[], None]:
    """Forward + backward of the layer's experts alone, on the rows (and routing weights) one
    dispatch gives them."""
    with torch.no_grad():
        routing = layer.gate.router(x)
        rows_YH, counts_e, ctx = layer.dispatcher.dispatch(x, routing)
    rows_YH = rows_YH.detach().requires_grad_()
    w_Y = ctx.row_weights_Y.detach().requires_grad_()
    gy_YH = torch.randn_like(rows_YH)

    def step() -> None:
        layer.experts(rows_YH, counts_e, w_Y).backward(gy_YH)

    return fresh_grads(step, [rows_YH, w_Y, *layer.experts.parameters()], accumulate)


def _gemm_ceiling_tflops(iters: int, warmup: int) -> float:
    N = 8192
    dev = torch.device("cuda")
    a = torch.randn(N, N, device=dev, dtype=torch.bfloat16)
    b = torch.randn(N, N, device=dev, dtype=torch.bfloat16)
    return 2.0 * N**3 / _cuda_time(lambda: torch.mm(a, b), iters, warmup) / 1e12


def _shape_rows(
    shape_name: str, s: dict[str, int], T: int, ceiling: float, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The rows of one shape: ours, and Megatron-Core's layer (or its error)."""
    dev = torch.device("cuda")
    H, Fh, E, K = s["hidden"], s["ffn"], s["experts"], s["top_k"]
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16).requires_grad_()
    gy = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    layer = our_layer(H, Fh, E, K, ParallelGroups.single(), args.fused_kernels)
    layer = layer.to(device=dev, dtype=torch.bfloat16)
    note = "grouped_mm" if layer.experts.use_grouped_mm(x) else "per-expert loop"
    ours = fresh_grads(layer_step(layer, x, gy), [x, *layer.parameters()], args.accumulate_grads)
    impls: dict[str, Impl] = {"ours": (ours, note, lambda: kept_bytes(layer, x))}
    try:
        if not args.only_ours:
            impls["megatron-core"] = _megatron_impl(x, gy, H, Fh, E, K, args.accumulate_grads)
    except Exception as exc:  # noqa: BLE001 - not importable or not buildable here: report it
        rows.append({"shape": shape_name, "impl": "megatron-core", "error": f"{type(exc).__name__}: {exc}"})
    gemm_bytes = gemm_activation_bytes(T * K, H, Fh, 2)  # bf16
    for name, (step, note, saved) in impls.items():
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
            "peak_over_gemm_activations": peak / gemm_bytes,
            "saved_for_backward_bytes": saved_bytes,
            "saved_over_gemm_activations": saved_bytes / gemm_bytes,
        }
        if name == "ours":  # router + dispatch + combine: the layer minus its experts alone
            experts_secs = _cuda_time(_experts_step(layer, x, args.accumulate_grads), args.iters, args.warmup)
            row["routing_overhead_fraction"] = 1.0 - experts_secs / secs
            if args.profile:
                row["profile"] = profile_steps(step, args.profile)
        rows.append(row)
    return rows


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("bench_layer_cuda: needs a CUDA GPU; none is visible")
    ceiling = _gemm_ceiling_tflops(args.iters, args.warmup)  # its operands are freed on return
    rows = []
    for shape_name, s in CUDA_SHAPES.items():
        rows += _shape_rows(shape_name, s, args.tokens, ceiling, args)
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "gemm_ceiling_tflops": ceiling,
        "rows": rows,
        "grads": "accumulated" if args.accumulate_grads else "fresh",
        "fused_kernels": args.fused_kernels,
        "compile_failures": compile_failures(),
    }


def print_table(out: dict[str, Any]) -> None:
    print(
        f"{out['device']}, bf16 GEMM ceiling {out['gemm_ceiling_tflops']:.0f} TFLOP/s,"
        f" gradients {out['grads']} across steps"
    )
    for r in out["rows"]:
        if "error" in r:
            print(f"{r['shape']:<15}{r['impl']:<15} not run: {r['error']}")
            continue
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
        if "profile" in r:
            print_profile(r["profile"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, tokens_default=8192, tokens_help="tokens (one GPU, EP = 1)")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N steps of ours (step_profile.py)"
    )
    p.add_argument("--only-ours", action="store_true", help="leave Megatron-Core's layer out")
    p.add_argument(
        "--accumulate-grads",
        action="store_true",
        help="keep gradients across timed steps (issue 24's method) instead of starting each step without",
    )
    args = p.parse_args(argv)
    check_positive(p, args, ["tokens", "iters"])
    out = run_cuda(args)
    print_table(out)
    finish(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
