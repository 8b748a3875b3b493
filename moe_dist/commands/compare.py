"""The ``moe-dist compare`` subcommand: arguments in, ``runner.compare`` out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moe_dist.compare.variants import (
    BASELINE,
    DEFAULT_VARIANTS,
    VARIANTS,
    UnknownVariantError,
    parse_variants,
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def compare_main(args: Any) -> int:
    try:
        from moe_dist.compare.runner import CompareOptions, compare  # noqa: PLC0415 - matplotlib is heavy
    except ImportError as exc:
        hint = "pip install 'moe_dist[plots]'"
        print(f"error: moe-dist compare needs matplotlib ({exc}); {hint}", file=sys.stderr)
        return 2

    try:
        variants = parse_variants(args.variants)
    except UnknownVariantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.baseline not in VARIANTS:
        print(
            f"error: --baseline: unknown variant {args.baseline!r}; known: {', '.join(VARIANTS)}",
            file=sys.stderr,
        )
        return 2
    opts = CompareOptions(
        config=args.config,
        variants=variants,
        out=Path(args.out),
        steps=args.steps,
        parallel=args.parallel,
        nproc=args.nproc,
        overrides=args.set,
        baseline=args.baseline,
        last_n=args.last_n,
        pes_tokens=args.pes_tokens,
        reuse=args.reuse,
        quiet=args.quiet,
    )
    return compare(opts)


def add_compare_parser(subparsers: Any) -> None:
    known = "; ".join(f"{v.name}: {v.description}" for v in VARIANTS.values())
    p = subparsers.add_parser(
        "compare",
        help="train several router/loss variants alike and tabulate loss, balance and PES",
        description=(
            "Train the model of CONFIG once per variant (same data, seed, lr, schedule and steps; only "
            "the router and balancing losses change), then write OUT/results.md, OUT/results.json and PNG "
            f"plots. Variants: {known}."
        ),
    )
    p.add_argument(
        "config", nargs="?", default="configs/compare.yaml", help="base YAML (default: configs/compare.yaml)"
    )
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated variant names (default: {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument("--out", default="runs/compare", help="results directory (default: runs/compare)")
    p.add_argument("--steps", type=_positive, default=None, help="override schedule.steps for every variant")
    p.add_argument("--parallel", type=_positive, default=1, help="variants trained at the same time")
    p.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        help="processes per run (torch.distributed.run); sets parallel.ep_size to it unless --set",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config value (every variant)",
    )
    p.add_argument("--baseline", default=BASELINE, help=f"iso-loss reference variant (default: {BASELINE})")
    p.add_argument("--last-n", type=_positive, default=100, help="steps whose counts the load metrics sum")
    p.add_argument("--pes-tokens", type=_positive, default=1024, help="validation tokens for PES")
    p.add_argument("--reuse", action="store_true", help="keep finished runs whose config is unchanged")
    p.add_argument("--quiet", action="store_true", help="no progress lines, no table on stdout")
    p.set_defaults(func=compare_main)
