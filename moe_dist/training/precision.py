"""``run.precision``, resolved once: which dtype a run computes in.

``bf16`` follows Megatron's ``--bf16`` and torchtitan's ``mixed_precision_param = "bfloat16"``:
master weights and optimizer state in fp32, compute in bf16, gradients reduced in fp32. ``auto``
is bf16 on CUDA (the GPUs this runs on compute bf16 at full rate) and fp32 on CPU (most CPUs
have no fast bf16 GEMM; CPU bf16 exists for tests of the GPU path's dtypes, through CPU
autocast).
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]


def resolved_precision(setting: str, device: torch.device) -> Precision:
    """``run.precision`` on ``device``: ``auto`` becomes bf16 on CUDA, fp32 elsewhere."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return "bf16" if setting == "bf16" else "fp32"
