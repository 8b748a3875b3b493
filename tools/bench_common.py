"""What both layer benchmarks (``bench_layer_cpu.py``, ``bench_layer_cuda.py``) share.

Shape legend: T tokens, H hidden, F expert ffn hidden, E experts, K top-k.

1. ``our_layer`` builds the layer both time: dropless, top-k softmax router, SwiGLU experts.
2. ``layer_flops`` is the useful work credited to every implementation: the SwiGLU experts'
   GEMMs of a forward + backward, ``3 * (4*T*K*H*F + 2*T*K*F*H)`` (router, dispatch and padding
   excluded, so a layer that pads or copies more gets no credit for it).
3. ``gemm_activation_bytes`` is the memory yardstick: what the expert GEMMs themselves keep for
   the backward, the rows [rows, H] and SwiGLU's two pre-activations [rows, F].
4. ``kept_bytes`` counts what one forward of a module keeps for its backward
   (``moe_dist.activation_memory``).
5. ``add_common_args`` / ``check_positive`` / ``finish``: the options both take, their checks,
   and the end of a run (the fallback note, the JSON file).

Importers put the repository root on ``sys.path`` first (the scripts run from a checkout).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moe_dist.activation_memory import saved_for_backward
from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups


def layer_flops(T: int, H: int, Fh: int, K: int) -> float:
    """Forward + backward FLOPs of the SwiGLU experts for T tokens (router and combine excluded)."""
    return 3.0 * (4 * T * K * H * Fh + 2 * T * K * Fh * H)


def gemm_activation_bytes(rows: int, H: int, Fh: int, itemsize: int) -> int:
    """Bytes the expert GEMMs need for the backward: [rows, H] inputs + 2 x [rows, F] pre-activations."""
    return rows * (H + 2 * Fh) * itemsize


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


def kept_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes one forward of ``module`` on ``x`` keeps for the backward (parameters and ``x`` left out)."""
    return saved_for_backward(lambda: module(x), [*module.parameters(), x])[0]


def layer_step(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of our layer, the output's gradient ``gy``."""

    def step() -> None:
        y, _ = layer(x)
        y.backward(gy)

    return step


def add_common_args(p: argparse.ArgumentParser, tokens_default: int, tokens_help: str) -> None:
    p.add_argument("--tokens", type=int, default=tokens_default, help=tokens_help)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--fused-kernels",
        choices=["auto", "compiled", "eager"],
        default="auto",
        help="our layer's memory-bound kernels (moe_dist/ops/compiled.py; auto: compiled on CUDA)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def finish(out: dict[str, Any], path: Path | None) -> None:
    """After the table: say whether the fused kernels fell back, write the JSON."""
    if out.get("compile_failures"):
        print(f"fused activation fell back to eager: {out['compile_failures']}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
