"""``moe-dist prepare-data INPUTS... -o NAME.bin``: a corpus as one memory-mapped token file."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_dist.data.corpus import DataError, expand_paths, write_token_file


def add_prepare_data_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare-data",
        help="write a memory-mapped byte-token file (.bin + .bin.json) from text",
        description="Concatenate text files, directories or globs into a token file for data.paths.",
    )
    p.add_argument("inputs", nargs="+", help="text files, directories or globs")
    p.add_argument("-o", "--output", required=True, help="output path, ending in .bin")
    p.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8")
    p.set_defaults(func=prepare_data_main)


def prepare_data_main(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".bin":
        raise DataError(f"--output: must end in .bin, got {str(out)!r}")
    files = [f for spec in args.inputs for f in expand_paths(spec)]
    header = write_token_file(files, out, args.dtype)
    if header["num_tokens"] == 0:
        raise DataError(f"prepare-data: the inputs {args.inputs} are empty")
    print(f"wrote {out} ({header['num_tokens']:,} tokens, {header['dtype']}) from {len(files)} files")
    print(f"use it with: --set 'data.paths=[{out}]'")
    return 0
