"""``moe-dist generate CHECKPOINT_DIR --prompt TEXT``: continue a prompt with a trained run's model.

Greedy by default (``--temperature 0``), sampled otherwise (``--top-p`` nucleus, ``--seed``);
the KV cache is on unless ``--no-cache``. Encodes and decodes with the run's tokenizer
(``data.tokenizer``: bytes or a ``tokenizers`` file) and prints the prompt followed by the
continuation. Decoding: ``moe_dist/models/generation.py``; the model: the newest usable
checkpoint under ``CHECKPOINT_DIR`` (``training/trained_model.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a trained run's model (greedy or sampled)",
        description="Generate text from the newest checkpoint of a run.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="run directory, checkpoints/ or a step_* dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--no-cache", action="store_true", help="re-run the whole sequence each step (no KV cache)"
    )
    p.set_defaults(func=generate_main)


def continue_prompt(
    checkpoint: str | Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    fit_context: bool = False,
) -> str:
    """The prompt and its continuation by the newest checkpoint under ``checkpoint``, decoded with the
    run's tokenizer. ``fit_context`` asks for fewer tokens where the model's context would overflow."""
    from moe_dist.data.tokenizer import load_tokenizer
    from moe_dist.models.generation import generate
    from moe_dist.training.trained_model import load_trained_model

    trained = load_trained_model(checkpoint)
    tok_cfg = trained.cfg.data.tokenizer
    tokenizer = load_tokenizer(tok_cfg.kind, tok_cfg.path)
    prompt_ids = tokenizer.encode_batch([prompt])[0]
    if fit_context:
        max_new_tokens = max(0, min(max_new_tokens, trained.cfg.model.max_seq_len - len(prompt_ids)))
    new_ids = generate(
        trained.model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        use_cache=use_cache,
        eos_id=tokenizer.eos_id,
    )
    return tokenizer.decode(prompt_ids + new_ids)


def generate_main(args: argparse.Namespace) -> int:
    # A GenerationError (bad request) reaches cli.main: one line, exit 2.
    text = continue_prompt(
        args.checkpoint,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    sys.stdout.write(text + "\n")
    return 0
