"""A small decoder-only MoE transformer (Llama/Mixtral layout): the model ``moe-dist train`` trains.

Shape legend: B batch, S sequence, H model dim, V vocabulary, F dense FFN hidden size.

Forward (``MoETransformer.forward(tokens_BS, doc_BS=None, cache=None) -> (logits_BSV, aux_loss,
aux_terms)``):
1. h = embed(tokens), in the residual stream's dtype (`residual_dtype`: under autocast the
   autocast dtype, as Megatron's default and FSDP's bf16 parameters give; fp32 with
   ``model.fp32_residual``, Megatron's ``--fp32-residual-connection``). With document numbers
   ``doc_BS`` (``data.document_mask``), one attention mask for all blocks that stops attention
   at document boundaries. With ``cache`` (one ``KVCache`` per block, generation) the tokens
   continue the cached positions.
2. For each block: h += attn(norm(h)); h += ffn(norm(h)), where ffn is a dense SwiGLU MLP for
   the first ``model.dense_layers`` blocks (DeepSeek's dense prefix) and a ``MoELayer`` after.
3. logits = norm(h) @ embed^T (tied embeddings) or a separate output matrix.
4. aux_loss = sum over MoE layers of every (already coefficient-weighted) aux term; aux_terms
   sums each term by name over the layers, for logging. Model-scope losses (``switch`` with
   ``scope: model``, Hugging Face's one loss over all layers' routing) are combined here from the
   shares every layer's gate kept (``model_scope_losses``) and added as one term each.

Activation checkpointing (``model.activation_checkpointing``) wraps each block in non-reentrant
``torch.utils.checkpoint``. The backward pass re-runs the block's forward; the MoE layer's load
statistics (token counts, drops, timings) must be counted once, so the recompute runs inside a
context that snapshots those statistics (the layer's `Gate`'s) and restores them afterwards
(exact, no halving).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_dist.config import ModelConfig
from moe_dist.layers.gate import HasGate, model_scope_losses
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.models.attention import CausalSelfAttention, KVCache, document_mask, residual_out_std
from moe_dist.models.norm import RMSNorm
from moe_dist.parallel.groups import ParallelGroups


class DenseFFN(nn.Module):
    """SwiGLU MLP: (silu(x W1) * x W3) W2."""

    def __init__(self, dim: int, hidden: int, out_std: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.w1.weight, std=0.02)
        nn.init.normal_(self.w3.weight, std=0.02)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BSH)) * self.w3(x_BSH))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, groups: ParallelGroups | None) -> None:
        super().__init__()
        out_std = residual_out_std(cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = CausalSelfAttention(
            cfg.dim,
            cfg.n_heads,
            cfg.max_seq_len,
            cfg.rope_theta,
            out_std,
            n_kv_heads=cfg.n_kv_heads,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.norm_eps,
            head_dim=cfg.head_dim,
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: nn.Module
        # Set once: the DeepSpeed engine swaps the MoELayer for another module that holds a Gate.
        self.is_moe = index >= cfg.dense_layers
        if not self.is_moe:
            self.ffn = DenseFFN(cfg.dim, cfg.dense_ffn_hidden_size, out_std)
        else:
            self.ffn = MoELayer(cfg.moe, cfg.dim, groups)

    def forward(
        self, h_BSH: torch.Tensor, mask_B1SS: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h_BSH = h_BSH + self.attn(self.attn_norm(h_BSH), mask_B1SS, cache)
        if self.is_moe:
            y_BSH, aux = self.ffn(self.ffn_norm(h_BSH))
        else:
            y_BSH, aux = self.ffn(self.ffn_norm(h_BSH)), {}
        return h_BSH + y_BSH, aux


class _EachTime(contextlib.AbstractContextManager):
    """A context manager that makes a new one from ``make()`` at every ``with`` (re-enterable)."""

    def __init__(self, make: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.make = make
        self.entered: list[contextlib.AbstractContextManager] = []

    def __enter__(self) -> Any:
        cm = self.make()
        self.entered.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        return self.entered.pop().__exit__(*exc)


class MoETransformer(nn.Module):
    """Decoder-only transformer whose FFNs are ``MoELayer``s (after ``dense_layers`` dense ones).

    Build every rank's model after seeding the default generator identically (``torch.manual_seed``):
    replicated weights then agree across ranks, and expert weights match the global layout for
    any EP size (``GroupedExperts`` draws all experts in global order).
    """

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, i, groups) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = None
        if not cfg.tie_embeddings:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            nn.init.normal_(self.output.weight, std=0.02)

    def compile_blocks(self) -> None:
        """``model.compile``: each block becomes its own compiled module (torchtitan's
        ``apply_compile``: a graph per block, one compile reused by every block of the same
        shapes). The MoE layer inside runs eagerly except its `Gate` (router, balancing losses,
        load statistics), compiled as its own region: it has static shapes at any EP size, and
        eagerly it is ~25 small ops per layer plus their backward, each a kernel launch, which
        is what makes a small model host-bound. (Megatron-Core's ``moe_router_fusion`` fuses the
        same work with Transformer Engine kernels.) The rest of the layer stays eager: its
        autograd functions, collectives and host-side plans are its own kernels already, and its
        memory-bound parts compile on their own (``ops/compiled.py``).
        (Disabled here, per instance, not with a decorator on the class: that would import
        ``torch._dynamo`` with the layer, seconds at every process start.)"""
        for block in self.blocks:
            if block.is_moe:
                block.ffn.forward = torch.compiler.disable(block.ffn.forward)
                block.ffn.gate.compile()
            block.compile()

    def moe_layers(self) -> list[HasGate]:
        """The MoE FFNs in block order; each exposes its `Gate` (router, losses, statistics) as ``.gate``."""
        return [b.ffn for b in self.blocks if b.is_moe]  # type: ignore[misc]

    def _run_block(
        self, block: Block, h_BSH: torch.Tensor, mask_B1SS: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not (self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()):
            return block(h_BSH, mask_B1SS)

        def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
            if not block.is_moe:
                return contextlib.nullcontext(), contextlib.nullcontext()
            # a fresh stats_restored() per recompute: a second backward through the same
            # forward (retain_graph) recomputes again
            return contextlib.nullcontext(), _EachTime(block.ffn.gate.stats_restored)

        return checkpoint(block, h_BSH, mask_B1SS, use_reentrant=False, context_fn=contexts)

    def forward(
        self,
        tokens_BS: torch.Tensor,
        doc_BS: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        h_BSH = self.embed(tokens_BS)
        h_BSH = h_BSH.to(self.residual_dtype(h_BSH))
        mask_B1SS = None if doc_BS is None else document_mask(doc_BS)
        aux_terms: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if cache is None:
                h_BSH, aux = self._run_block(block, h_BSH, mask_B1SS)
            else:  # generation: no activation checkpointing, each block extends its cache
                h_BSH, aux = block(h_BSH, mask_B1SS, cache[i])
            for name, value in aux.items():
                aux_terms[name] = aux_terms[name] + value if name in aux_terms else value
        aux_terms.update(model_scope_losses([layer.gate for layer in self.moe_layers()]))
        h_BSH = self.norm(h_BSH)
        weight_VH = self.embed.weight if self.output is None else self.output.weight
        logits_BSV = F.linear(h_BSH, weight_VH.to(h_BSH.dtype))
        aux_loss = sum(aux_terms.values(), torch.zeros((), device=logits_BSV.device))
        return logits_BSV, aux_loss, aux_terms

    def residual_dtype(self, h_BSH: torch.Tensor) -> torch.dtype:
        """The residual stream's dtype: under autocast its dtype unless ``model.fp32_residual``
        (halves the bytes of every residual add and norm input on a GPU); otherwise the
        embedding's (fp32, or bf16 under FSDP's bf16 parameters)."""
        device = h_BSH.device.type
        if torch.is_autocast_enabled(device) and not self.cfg.fp32_residual:
            return torch.get_autocast_dtype(device)
        return h_BSH.dtype

    def num_params(self) -> dict[str, int]:
        """Parameters on this rank: total, and the expert-parallel share."""
        expert = sum(p.numel() for p in self.parameters() if getattr(p, "expert_parallel", False))
        return {"total": sum(p.numel() for p in self.parameters()), "expert": expert}


def build_model(cfg: ModelConfig, groups: ParallelGroups | None = None, seed: int = 0) -> MoETransformer:
    """The model with weights drawn from ``seed`` (identical replicated weights on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoETransformer(cfg, groups)
