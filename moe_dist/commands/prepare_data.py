"""``moe-dist prepare-data INPUTS... --tokenizer tokenizer.json -o PREFIX``: a Megatron indexed dataset.

1. Inputs: text files, directories or globs; one document per file, or one per record of a
   ``.jsonl`` file (its ``--text-field``).
2. Tokenize with ``--tokenizer`` (a ``tokenizers`` file; without it, bytes with no EOS), EOS
   after each document, in batches (``--no-batch-parallel``: one thread).
3. Write ``PREFIX.bin`` + ``PREFIX.idx`` (uint16 below 65500 ids, int32 above, as Megatron-LM's
   ``preprocess_data.py``), atomically; train on it with ``data.paths: [PREFIX]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moe_dist.data.corpus import expand_paths
from moe_dist.data.documents import iter_documents, write_documents
from moe_dist.data.errors import DataError
from moe_dist.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def add_prepare_data_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenize text into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx)",
        description="Tokenize text files, directories, globs or .jsonl records (EOS after each document) "
        "into PREFIX.bin + PREFIX.idx for data.paths.",
    )
    p.add_argument("inputs", nargs="+", help="text files, directories, globs or .jsonl files")
    p.add_argument("-o", "--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--tokenizer", help="tokenizer.json (moe-dist train-tokenizer); default: bytes, no EOS")
    p.add_argument("--text-field", default="text", help="field of a .jsonl record that holds its text")
    p.add_argument(
        "--no-batch-parallel",
        action="store_true",
        help="tokenize on one thread (tokenizers' batch parallelism off)",
    )
    p.set_defaults(func=prepare_data_main)


def output_prefix(spec: str) -> Path:
    out = Path(spec).expanduser()
    return out.with_suffix("") if out.suffix in (".bin", ".idx") else out


def prepare_data_main(args: argparse.Namespace) -> int:
    prefix = output_prefix(args.output)
    tokenizer: Tokenizer = ByteTokenizer()
    if args.tokenizer:
        tokenizer = HFTokenizer(args.tokenizer, parallel=not args.no_batch_parallel)
    files = [f for spec in args.inputs for f in expand_paths(spec)]
    bad = [
        f for f in files if f.resolve() in {Path(f"{prefix}.bin").resolve(), Path(f"{prefix}.idx").resolve()}
    ]
    if bad:
        raise DataError(f"prepare-data: input {str(bad[0])!r} is the output itself")
    t0 = time.perf_counter()
    report = write_documents(
        iter_documents(files, args.text_field), tokenizer, prefix, f"prepare-data {args.inputs}"
    )
    seconds = time.perf_counter() - t0
    print(
        f"wrote {prefix}.bin + .idx: {report.documents:,} documents, {report.tokens:,} "
        f"{report.dtype.name} tokens from {len(files)} files "
        f"({report.tokens / max(seconds, 1e-9):,.0f} tokens/s, tokenizer {tokenizer.name})"
        + (f"; skipped {report.skipped_empty} empty documents" if report.skipped_empty else "")
    )
    print(f"use it with: --set 'data.paths=[{prefix}]'")
    return 0
