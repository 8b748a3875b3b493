"""Generation: greedy decoding deterministic, KV-cache decoding equal to re-running the sequence,
nucleus sampling keeping exactly its nucleus, and ``moe-dist generate`` through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from moe_dist.commands.generate import continue_prompt
from moe_dist.data.tokenizer import ByteTokenizer
from moe_dist.models.attention import KVCache
from moe_dist.models.generation import GenerationError, generate, next_token
from moe_dist.training.trained_model import load_trained_model

PROMPT = "def add(a"


def test_next_token_greedy_and_nucleus() -> None:
    g = torch.Generator().manual_seed(0)
    logits_V = torch.tensor([0.5, 0.3, 0.2]).log()
    assert next_token(logits_V, 0.0, 1.0, g) == 0
    drawn = {next_token(logits_V, 1.0, 0.6, g) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.6, so the nucleus is {0, 1}; token 2 never drawn
    drawn = {next_token(logits_V, 1.0, 1.0, g) for _ in range(300)}
    assert drawn == {0, 1, 2}
    assert {next_token(logits_V, 1.0, 0.4, g) for _ in range(50)} == {0}  # the top token is always kept


@pytest.mark.slow  # the session's run trains through the CLI first
def test_cached_decoding_equals_rerunning_the_sequence(mixtral_run: Path) -> None:
    model = load_trained_model(mixtral_run).model
    prompt = ByteTokenizer().encode_batch([PROMPT])[0]
    greedy = generate(model, prompt, 20)
    assert len(greedy) == 20
    assert generate(model, prompt, 20) == greedy  # deterministic
    assert generate(model, prompt, 20, use_cache=False) == greedy
    sampled = generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=5)
    assert generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=5, use_cache=False) == sampled
    assert generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=6) != sampled
    assert generate(model, prompt, 20, temperature=1.0, top_p=1e-6, seed=6) == greedy  # nucleus of one
    # the logits themselves: prompt + one token at a time through the cache == one full forward
    tokens_BS = torch.tensor([prompt + greedy])
    with torch.no_grad():
        full_BSV = model(tokens_BS)[0]
        cache = [KVCache() for _ in model.blocks]
        steps = [model(tokens_BS[:, : len(prompt)], cache=cache)[0]]
        steps += [
            model(tokens_BS[:, i : i + 1], cache=cache)[0] for i in range(len(prompt), tokens_BS.shape[1])
        ]
    assert torch.allclose(torch.cat(steps, dim=1), full_BSV, atol=1e-5, rtol=0)


def test_requests_the_model_cannot_serve(mixtral_run: Path) -> None:
    model = load_trained_model(mixtral_run).model
    with pytest.raises(GenerationError, match=r"exceeds model.max_seq_len \(32\); ask for at most 22"):
        generate(model, list(range(10)), 23)
    with pytest.raises(GenerationError, match="--prompt: empty"):
        generate(model, [], 4)
    with pytest.raises(GenerationError, match="--top-p"):
        generate(model, [1], 4, temperature=1.0, top_p=0.0)


@pytest.mark.slow  # three CLI runs
def test_generate_cli(mixtral_run: Path) -> None:
    model = load_trained_model(mixtral_run).model
    expected = ByteTokenizer().decode(
        ByteTokenizer().encode_batch([PROMPT])[0] + generate(model, [*PROMPT.encode()], 16)
    )
    cached = run_cli("generate", str(mixtral_run), "--prompt", PROMPT, "--max-new-tokens", "16")
    uncached = run_cli(
        "generate", str(mixtral_run), "--prompt", PROMPT, "--max-new-tokens", "16", "--no-cache"
    )
    assert cached.returncode == 0 and uncached.returncode == 0, cached.stderr + uncached.stderr
    assert cached.stdout == uncached.stdout == expected + "\n"
    bad = run_cli("generate", str(mixtral_run), "--prompt", PROMPT, "--max-new-tokens", "30")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --max-new-tokens: the prompt (9 tokens) plus 30 new tokens exceeds model.max_seq_len (32); "
        "ask for at most 23"
    ]


def test_demo_sample_fits_the_context(mixtral_run: Path) -> None:
    """The demo's sample (``continue_prompt(..., fit_context=True)``) asks for no more than fits."""
    model = load_trained_model(mixtral_run).model
    line = continue_prompt(mixtral_run, PROMPT, 60, fit_context=True)
    assert line == ByteTokenizer().decode(
        [*PROMPT.encode(), *generate(model, [*PROMPT.encode()], 32 - len(PROMPT))]
    )
