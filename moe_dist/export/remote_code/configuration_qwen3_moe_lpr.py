"""Qwen3-MoE configuration with Latent Prototype Routing (written by ``moe-dist export-hf``).

``Qwen3MoeConfig`` plus three keys read by ``modeling_qwen3_moe_lpr.py``:

- ``lpr_latent_dim``: D, the router's latent size (``Linear(hidden_size, 2 D)`` encoder);
- ``lpr_add_decoded_latent``: the experts see ``x + out_proj(softmax(scores) @ keys)``;
- ``lpr_layer_norm_eps``: eps of the router's LayerNorm.
"""

from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig


class Qwen3MoeLPRConfig(Qwen3MoeConfig):
    model_type = "qwen3_moe_lpr"

    def __init__(
        self,
        lpr_latent_dim: int = 16,
        lpr_add_decoded_latent: bool = True,
        lpr_layer_norm_eps: float = 1e-5,
        **kwargs,
    ):
        self.lpr_latent_dim = lpr_latent_dim
        self.lpr_add_decoded_latent = lpr_add_decoded_latent
        self.lpr_layer_norm_eps = lpr_layer_norm_eps
        super().__init__(**kwargs)
