"""What the final checkpoint of a run does on validation tokens: capacity drops and PES.

Shape legend: B batch, S sequence, T = B * S tokens of one validation batch, H hidden size,
E experts, K slots per token, N sampled tokens.

``analyze_final_model(run_dir)``:

1. Rebuild the model from ``run_dir/config.json`` and load the newest checkpoint (single process,
   whatever EP size the run used: ``training.trained_model.load_trained_model``).
2. Run the fixed validation batches (the same ones for every variant: they depend on the seed
   only) in eval mode; a forward pre-hook records each MoE layer's input x_TH.
3. Drops at capacity factor ``cf``: per layer and batch, route x_TH with the layer's router; an
   expert accepts ``ceil(cf * slots / E)`` token-slots (slots = T * K for top-k routers, the
   capacity ``moe_dist.ops.slot_sort.capacity_per_expert`` uses); the excess is dropped.
   Reported: dropped / routed slots over all batches, per layer, and their mean over layers.
4. PES (SimBal Eq. 5-6): on ``pes_tokens`` validation tokens drawn uniformly without
   replacement from the validation batches' tokens (a generator seeded with ``run.seed``, so the
   sample is the same for every arm of a seed; SimBal samples 4M tokens at random), every
   expert's output for the expert input (x, plus the router's decoded latent for LPR), mean
   pairwise cosine; ``moe_dist.metrics.pairwise_expert_similarity`` per layer, min over layers
   as the paper reports. When the batches hold fewer tokens, all of them are used (the result
   says how many).
5. The combine weights' shape, per layer over all validation tokens: ``weight_sum`` (mean of
   sum_k w_TK: 1 for renormalised routers, 0.18-0.30 for Qwen3's unrenormalised top-8) and
   ``top1_share`` (mean of max_k w_TK / sum_k w_TK: 1/K for uniform weights, 1 for one expert).
   They tell a peaked router from a flat one (LPR's softmax over k cosines in [-1, 1] is flat).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from moe_dist import metrics
from moe_dist.data.batches import TokenBatches
from moe_dist.training.trained_model import load_trained_model


def capacity_drops(counts_E: torch.Tensor, capacity_factor: float) -> tuple[float, float]:
    """(dropped slots, routed slots) when each expert accepts ``ceil(cf * slots / E)``."""
    routed = float(counts_E.sum())
    cap = math.ceil(capacity_factor * routed / counts_E.numel())
    return float((counts_E - cap).clamp(min=0).sum()), routed


@torch.no_grad()
def analyze_final_model(
    run_dir: str | Path,
    num_batches: int | None = None,
    pes_tokens: int = 1024,
    capacity_factor: float = 1.0,
    device: str = "auto",
) -> dict[str, Any]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = load_trained_model(run_dir, device)
    cfg, model = trained.cfg, trained.model
    batches = TokenBatches.for_run(cfg)
    layers = model.moe_layers()
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(layers)
    ]
    dropped = [0.0] * len(layers)
    routed = [0.0] * len(layers)
    pes_inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    weight_sum = [0.0] * len(layers)
    top1_share = [0.0] * len(layers)
    n_tokens = [0] * len(layers)
    n_batches = num_batches or cfg.eval.batches
    per_batch = cfg.data.micro_batch_size * cfg.data.seq_len
    total = n_batches * per_batch
    gen = torch.Generator().manual_seed(cfg.run.seed)
    chosen = torch.randperm(total, generator=gen)[: min(pes_tokens, total)].sort().values
    try:
        for b in range(n_batches):
            rows_T = chosen[(chosen >= b * per_batch) & (chosen < (b + 1) * per_batch)] - b * per_batch
            batch = batches.val_batch(b).to(device)
            model(batch.x_BS, batch.doc_BS)
            for i, layer in enumerate(layers):
                x_TH = inputs[i].reshape(-1, layer.hidden_size).float()
                routing = layer.gate.router(x_TH)
                d, r = capacity_drops(routing.counts_E(), capacity_factor)
                dropped[i] += d
                routed[i] += r
                w_TK = routing.weights_TK.float()
                sum_T = w_TK.sum(dim=-1)
                weight_sum[i] += float(sum_T.sum())
                top1_share[i] += float((w_TK.amax(dim=-1) / sum_T.clamp(min=1e-12)).sum())
                n_tokens[i] += w_TK.shape[0]
                if len(rows_T):
                    xe_TH = (
                        x_TH
                        if routing.expert_input_delta_TH is None
                        else x_TH + routing.expert_input_delta_TH
                    )
                    pes_inputs[i].append(xe_TH[rows_T.to(xe_TH.device)])
    finally:
        for h in hooks:
            h.remove()
    drop_per_layer = [metrics.dropped_fraction(d, r) for d, r in zip(dropped, routed)]
    pes_per_layer = [
        metrics.pairwise_expert_similarity(layer.experts, torch.cat(xs))
        for layer, xs in zip(layers, pes_inputs)
    ]
    return {
        "checkpoint_step": trained.step,
        "capacity_factor": capacity_factor,
        "drop_fraction_per_layer": drop_per_layer,
        "drop_fraction": sum(drop_per_layer) / len(drop_per_layer),
        "pes_tokens": len(chosen),
        "pes_per_layer": pes_per_layer,
        "pes_min": min(pes_per_layer),
        "pes_mean": sum(pes_per_layer) / len(pes_per_layer),
        "weight_sum_per_layer": [w / n for w, n in zip(weight_sum, n_tokens)],
        "weight_sum": sum(weight_sum) / sum(n_tokens),
        "top1_share_per_layer": [t / n for t, n in zip(top1_share, n_tokens)],
        "top1_share": sum(top1_share) / sum(n_tokens),
    }
