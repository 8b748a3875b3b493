"""Qwen3-MoE with Latent Prototype Routing (LPR, arXiv 2506.21328): Hugging Face remote code.

Written by ``moe-dist export-hf --arch qwen3_moe_lpr`` next to ``config.json`` (``auto_map``), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it; it needs only
``torch`` and ``transformers`` >= 5 (whose Qwen3-MoE experts are the fused ``Qwen3MoeExperts``).
Everything is transformers' Qwen3-MoE except the sparse MoE block's router, per token x:

1. h = SiLU(LayerNorm(x)); (mu, logvar) = Linear(H, 2 D)(h).chunk(2) (logvar unused here).
2. scores = cosine(mu, expert_keys) over all E experts; top-k; weights = softmax over the k cosines.
3. With ``lpr_add_decoded_latent``, the experts' input is x + out_proj(softmax(scores) @ expert_keys).

The router runs in fp32 whatever the model's dtype, as in moe_dist. Inference only: the LPR
regularisers (latent diversity, KL, key alignment) and the EMA key update are training-time terms
of moe_dist and are not implemented, and the router's scores are not recorded as
``router_logits`` (``output_router_logits`` adds no balancing loss): fine-tuning through
transformers would optimise the language-model loss alone.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeExperts,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
)

from .configuration_qwen3_moe_lpr import Qwen3MoeLPRConfig


class Qwen3MoeLPRRouter(nn.Module):
    """Returns (cosine scores [T, E], top-k weights [T, K], top-k experts [T, K], decoded latent [T, H])."""

    def __init__(self, config):
        super().__init__()
        H, D, E = config.hidden_size, config.lpr_latent_dim, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.add_decoded_latent = config.lpr_add_decoded_latent
        self.norm = nn.LayerNorm(H, eps=config.lpr_layer_norm_eps)
        self.encoder = nn.Linear(H, 2 * D)
        self.out_proj = nn.Linear(D, H)
        self.expert_keys = nn.Parameter(torch.zeros(E, D))

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        with torch.autocast(x.device.type, enabled=False):
            n, enc, out = self.norm, self.encoder, self.out_proj
            h = F.silu(F.layer_norm(x, n.normalized_shape, n.weight.float(), n.bias.float(), n.eps))
            mu, _logvar = F.linear(h, enc.weight.float(), enc.bias.float()).chunk(2, dim=-1)
            keys = self.expert_keys.float()
            scores = F.cosine_similarity(mu.unsqueeze(1), keys.unsqueeze(0), dim=-1)
            top_values, top_experts = scores.topk(self.top_k, dim=-1)
            weights = top_values.softmax(dim=-1)
            delta = None
            if self.add_decoded_latent:
                delta = F.linear(scores.softmax(dim=-1) @ keys, out.weight.float(), out.bias.float())
        return scores, weights, top_experts, delta


class Qwen3MoeLPRSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    def __init__(self, config):
        nn.Module.__init__(self)
        self.experts = Qwen3MoeExperts(config)
        self.gate = Qwen3MoeLPRRouter(config)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        x = hidden_states.view(-1, hidden_dim)
        _, weights, experts, delta = self.gate(x)
        if delta is not None:
            x = x + delta.to(x.dtype)
        out = self.experts(x, experts, weights.to(x.dtype))
        return out.reshape(batch_size, sequence_length, hidden_dim)


def _use_lpr_blocks(layers, config):
    for layer in layers:
        if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock):
            layer.mlp = Qwen3MoeLPRSparseMoeBlock(config)


class Qwen3MoeLPRModel(Qwen3MoeModel):
    config_class = Qwen3MoeLPRConfig

    def post_init(self):
        _use_lpr_blocks(self.layers, self.config)  # before transformers' init and bookkeeping
        super().post_init()


class Qwen3MoeLPRForCausalLM(Qwen3MoeForCausalLM):
    config_class = Qwen3MoeLPRConfig

    def post_init(self):
        _use_lpr_blocks(self.model.layers, self.config)
        super().post_init()


__all__ = ["Qwen3MoeLPRForCausalLM", "Qwen3MoeLPRModel", "Qwen3MoeLPRSparseMoeBlock"]
