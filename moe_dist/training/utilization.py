"""What a step uses of the machine: peak memory per rank, model FLOPs per token and MFU.

Peak memory (every device): CPU, the process's maximum resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux, turned into bytes); CUDA,
``torch.cuda.max_memory_allocated`` (tensors held by PyTorch's caching allocator, not the
reserved pool). Both are running peaks since the process started.

MFU (CUDA only), nanoGPT / PaLM (Chowdhery et al. 2022, appendix B) style::

    flops_per_token = 6 * N_active + 12 * n_layers * dim * seq_len
    MFU = flops_per_token * tokens_per_s / (world_size * peak_flops_per_device)

``N_active`` is the parameters one token's forward touches: every non-expert weight except the
embedding table (a lookup, no matmul), plus the output projection ``vocab * dim`` (tied or not),
plus ``k`` experts' weights per MoE layer (``k`` = the router's ``top_k``; expert choice: its
``capacity_factor``, the mean slots per token). 6 = 2 (multiply-add) x 3 (forward, backward for
activations and for weights). ``12 * n_layers * dim * seq_len`` is the attention score and value
matmuls (forward + backward, counted without the causal half, as PaLM does). Activation
recomputation is not counted (model FLOPs, not hardware FLOPs). The peak is bf16 dense tensor
throughput from ``PEAK_TFLOPS`` by device name, or ``run.peak_tflops``.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_dist.config import Config
from moe_dist.parallel.groups import ParallelGroups

# bf16 dense tensor-core TFLOP/s (vendor data sheets, no sparsity); the first match of a device
# name wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    """The table's bf16 dense peak for a device name (``torch.cuda.get_device_name``), else None."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: CUDA max allocated, or CPU max RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def slots_per_token(cfg: Config) -> float:
    """Expert slots one token occupies per MoE layer (top_k; expert choice: its capacity factor)."""
    router = cfg.model.moe.router
    if getattr(router, "name", "") == "expert_choice":
        return float(getattr(router, "capacity_factor", 1.0))
    return float(getattr(router, "top_k", 1))


def active_params(model: torch.nn.Module, cfg: Config) -> int:
    """``N_active`` of the formula above, from this rank's model (experts: per local expert)."""
    expert = dense = 0
    for p in model.parameters():
        if getattr(p, "expert_parallel", False):
            expert += p.numel()
        else:
            dense += p.numel()
    embed = model.embed.weight.numel() if hasattr(model, "embed") else 0
    output = getattr(model, "output", None)
    head = output.weight.numel() if output is not None else 0
    moe = cfg.model.moe
    n_moe = sum(1 for b in getattr(model, "blocks", []) if getattr(b, "is_moe", False))
    local_experts = moe.num_experts // max(1, cfg.parallel.ep_size)
    per_expert_all_layers = expert / max(1, local_experts) if n_moe else 0.0
    return int(
        dense
        - embed
        - head
        + cfg.model.vocab_size * cfg.model.dim
        + slots_per_token(cfg) * per_expert_all_layers
    )


def flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """Training FLOPs per token: ``6 * N_active + 12 * n_layers * dim * seq_len``."""
    m = cfg.model
    return 6.0 * active_params(model, cfg) + 12.0 * m.n_layers * m.dim * cfg.data.seq_len


@dataclass
class Utilization:
    """Peak memory per rank and MFU for the step records (built once per run)."""

    device: torch.device
    rank: int
    world_size: int
    flops_per_token: float | None = None  # CUDA with a known peak only
    peak_flops: float | None = None

    @classmethod
    def for_run(
        cls,
        cfg: Config,
        model: torch.nn.Module,
        device: torch.device,
        groups: ParallelGroups,
        say: Callable[[str], None],
    ) -> Utilization:
        """``say`` gets one line when MFU is left out on CUDA (an unknown device peak)."""
        u = cls(device, groups.rank, groups.world_size)
        if device.type != "cuda":
            return u
        name = torch.cuda.get_device_name(device)
        peak = cfg.run.peak_tflops or peak_tflops_for(name)
        if peak is None:
            say(f"MFU left out: no peak TFLOP/s known for {name} (set run.peak_tflops)")
            return u
        u.flops_per_token, u.peak_flops = flops_per_token(model, cfg), peak * 1e12
        return u

    def all_ranks_peak_memory(self, groups: ParallelGroups) -> list[float]:
        """Every rank's peak memory so far (index = rank), on the steps that log (collective):
        this rank's value in its slot of a ``[world]`` vector, summed over ranks."""
        slots = torch.zeros(self.world_size, dtype=torch.float64)
        slots[self.rank] = float(peak_memory_bytes(self.device))
        if groups.distributed:
            slots = slots.to(self.device) if dist.get_backend() == "nccl" else slots
            dist.all_reduce(slots)
        return slots.tolist()

    def fields(self, memory_W: list[float], tokens_per_s: float) -> dict[str, Any]:
        """The record's ``peak_memory_bytes`` (per rank) and, on CUDA, ``mfu``."""
        out: dict[str, Any] = {"peak_memory_bytes": [int(v) for v in memory_W]}
        if self.flops_per_token is not None and self.peak_flops:
            out["mfu"] = self.flops_per_token * tokens_per_s / (self.world_size * self.peak_flops)
        return out
