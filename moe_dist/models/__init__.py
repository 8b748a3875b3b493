"""Models trained by ``moe-dist train``: a decoder-only MoE transformer."""

from moe_dist.models.transformer import MoETransformer, build_model

__all__ = ["MoETransformer", "build_model"]
