"""``moe-dist train-tokenizer FILES... -o tokenizer.json --vocab-size N``: a byte-level BPE.

Trains Hugging Face ``tokenizers``' BPE with GPT-2's byte-level pre-tokenizer on local text
files, directories or globs (one document per file, or per record of a ``.jsonl`` file, its
``--text-field``), with ``<|endoftext|>`` as EOS; use it with
``data.tokenizer: {kind: hf, path: tokenizer.json}`` and ``moe-dist prepare-data --tokenizer``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_dist.data.corpus import expand_paths
from moe_dist.data.documents import iter_documents
from moe_dist.data.errors import DataError
from moe_dist.data.tokenizer import train_bpe


def add_train_tokenizer_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer (tokenizer.json) on local text",
        description="Train a byte-level BPE with an EOS token on text files, directories or globs.",
    )
    p.add_argument("inputs", nargs="+", help="text files, directories, globs or .jsonl files")
    p.add_argument("-o", "--output", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, EOS included")
    p.add_argument("--text-field", default="text", help="field of a .jsonl record that holds its text")
    p.set_defaults(func=train_tokenizer_main)


def train_tokenizer_main(args: argparse.Namespace) -> int:
    if args.vocab_size < 257:
        raise DataError(f"--vocab-size: must be > 256 (the byte alphabet and EOS), got {args.vocab_size}")
    files = [f for spec in args.inputs for f in expand_paths(spec)]
    texts = [d.text for d in iter_documents(files, args.text_field) if d.text]
    if not texts:
        raise DataError(f"train-tokenizer: the inputs {args.inputs} hold no text")
    tok = train_bpe(texts, args.vocab_size, Path(args.output))
    size = tok.vocab_size
    smaller = (
        f" (asked for {args.vocab_size:,}; BPE stopped when no pair of tokens in the text was left to merge)"
        if size < args.vocab_size
        else ""
    )
    print(f"wrote {args.output}: byte-level BPE, vocabulary {size:,}{smaller}, EOS id {tok.eos_id}")
    print(
        f"use it with: --set data.tokenizer.kind=hf --set data.tokenizer.path={args.output} "
        f"--set model.vocab_size={size}"
    )
    return 0
