"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * g, computed in fp32 whatever the input dtype.

NVIDIA apex's ``FusedRMSNorm`` is used when apex is importable and the input is on CUDA (as in
NVIDIA's PyTorch container); the same maths otherwise, so checkpoints move between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # apex ships in NVIDIA's PyTorch container; PyPI's "apex" is an unrelated project
    from apex.normalization import fused_rms_norm_affine as _apex_rms_norm  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the image
    _apex_rms_norm = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        if _apex_rms_norm is not None and x_BSH.is_cuda:
            return _apex_rms_norm(x_BSH, self.weight, self.weight.shape, self.eps)
        # torch's rms_norm: x * rsqrt(mean(x^2) + eps) * g, the maths above; on CUDA one fused
        # kernel each way where torch has it, instead of ~6 elementwise passes forward and ~10 back
        y = F.rms_norm(x_BSH.float(), self.weight.shape, self.weight.float(), self.eps)
        return y.to(x_BSH.dtype)
