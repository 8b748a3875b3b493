"""Autoregressive decoding of an ``MoETransformer``: greedy or sampled, KV cache optional.

Shape legend: B batch (1 here), S positions fed in one forward, V vocabulary.

``generate(model, prompt_ids, max_new_tokens, ...) -> new ids``:

1. With the cache (default), the prompt runs once and fills one ``KVCache`` per block
   (``MoETransformer.forward(tokens, cache=...)``); each later step feeds only the newest token.
   Without it (``use_cache=False``), every step re-runs the whole sequence: slower, the reference
   the cached path must equal.
2. The next token from the last position's logits (``next_token``): ``temperature`` 0 takes the
   argmax (greedy: deterministic, the first maximum on ties); otherwise softmax(logits / T),
   restricted to the smallest set of most likely tokens whose probability reaches ``top_p``
   (nucleus sampling, Holtzman et al. 2019, as ``transformers``' ``TopPLogitsWarper``: the most
   likely token is always kept), renormalised and sampled from a ``torch.Generator`` seeded with
   ``seed``, so the same seed gives the same text.
3. Stops after ``max_new_tokens`` or at ``eos_id``, which is returned as the last token.

The model sees at most ``model.max_seq_len`` positions (its RoPE tables): a longer prompt plus
``max_new_tokens`` is a ``GenerationError`` (no sliding window, so the cached and the uncached
paths always see the same context).
"""

from __future__ import annotations

import torch

from moe_dist.models.attention import KVCache
from moe_dist.models.transformer import MoETransformer


class GenerationError(ValueError):
    """Bad generation request (empty prompt, too long, bad sampling parameter): one line."""


def next_token(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """The next token id from one position's logits (module docstring, step 2)."""
    if temperature == 0.0:
        return int(logits_V.argmax())
    probs_V = (logits_V.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_V, order_V = probs_V.sort(descending=True)
        mass_before_V = sorted_V.cumsum(dim=-1) - sorted_V  # probability of the more likely tokens
        sorted_V = torch.where(mass_before_V < top_p, sorted_V, torch.zeros_like(sorted_V))
        probs_V = torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)
    return int(torch.multinomial(probs_V / probs_V.sum(), 1, generator=generator))


def check_request(
    model: MoETransformer, n_prompt: int, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """``GenerationError`` for a request the model cannot serve (module docstring)."""
    limit = model.cfg.max_seq_len
    if n_prompt == 0:
        raise GenerationError("--prompt: empty (no tokens to start from)")
    if max_new_tokens < 0:
        raise GenerationError(f"--max-new-tokens: must be >= 0, got {max_new_tokens}")
    if n_prompt + max_new_tokens > limit:
        raise GenerationError(
            f"--max-new-tokens: the prompt ({n_prompt} tokens) plus {max_new_tokens} new tokens exceeds "
            f"model.max_seq_len ({limit}); ask for at most {max(limit - n_prompt, 0)}"
        )
    if temperature < 0.0:
        raise GenerationError(f"--temperature: must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"--top-p: must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    eos_id: int | None = None,
) -> list[int]:
    """The ids ``model`` continues ``prompt_ids`` with (module docstring); the model is put in eval mode."""
    check_request(model, len(prompt_ids), max_new_tokens, temperature, top_p)
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cache = [KVCache() for _ in model.blocks] if use_cache else None
    seq = list(prompt_ids)
    new: list[int] = []
    feed = seq
    for _ in range(max_new_tokens):
        tokens_BS = torch.tensor([feed], dtype=torch.long, device=device)
        logits_BSV, _, _ = model(tokens_BS, cache=cache)
        token = next_token(logits_BSV[0, -1].cpu(), temperature, top_p, generator)
        new.append(token)
        seq.append(token)
        if token == eos_id:
            break
        feed = [token] if use_cache else seq
    return new
