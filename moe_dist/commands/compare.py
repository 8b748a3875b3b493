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


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def compare_main(args: Any) -> int:
    try:
        from moe_dist.compare.runner import CompareOptions, compare  # noqa: PLC0415 - matplotlib is heavy
    except ImportError as exc:
        hint = "pip install 'moe_dist[plots]'"
        print(f"error: moe-dist compare needs matplotlib ({exc}); {hint}", file=sys.stderr)
        return 2
    from moe_dist.compare.presets import preset_path

    if args.preset and args.config:
        print("error: give a CONFIG or --preset, not both", file=sys.stderr)
        return 2
    if args.fresh and args.report_only:
        print("error: give --fresh or --report-only, not both", file=sys.stderr)
        return 2
    config = str(preset_path(args.preset)) if args.preset else (args.config or "configs/compare.yaml")
    variants = None
    if args.variants:
        try:
            variants = parse_variants(args.variants, known=_known_arms(config))
        except UnknownVariantError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    out = args.out or (f"runs/compare_{args.preset}" if args.preset else "runs/compare")
    opts = CompareOptions(
        config=config,
        variants=variants,
        out=Path(out),
        steps=args.steps,
        parallel=args.parallel,
        nproc=args.nproc,
        overrides=args.set,
        baseline=args.baseline,
        last_n=args.last_n,
        pes_tokens=args.pes_tokens,
        seeds=args.seeds,
        fresh=args.fresh,
        quiet=args.quiet,
        report_only=args.report_only,
    )
    return compare(opts)


def _known_arms(config: str) -> dict[str, Any]:
    from moe_dist.compare.presets import split_compare_file

    return split_compare_file(config)[1].variants() or VARIANTS


def add_compare_parser(subparsers: Any) -> None:
    known = "; ".join(f"{v.name}: {v.description}" for v in VARIANTS.values())
    p = subparsers.add_parser(
        "compare",
        help="train several router/loss arms alike (over seeds) and tabulate loss, balance and PES",
        description=(
            "Train the model of CONFIG once per arm and seed (same data, lr, schedule and steps; only "
            "the router and balancing losses change), then write OUT/results.md, OUT/results.json and PNG "
            "plots. A CONFIG with a compare: section (configs/compare/*.yaml, --preset NAME) names its own "
            "arms, seeds, baseline and claims; otherwise the built-in variants: "
            f"{known}. Run the same command again to continue a killed comparison."
        ),
    )
    p.add_argument("config", nargs="?", default=None, help="base YAML (default: configs/compare.yaml)")
    p.add_argument("--preset", help="configs/compare/NAME.yaml, e.g. lpr_paper, simbal_paper")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated arms (default: the file's arms, or {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument(
        "--out", default=None, help="results directory (default: runs/compare or runs/compare_PRESET)"
    )
    p.add_argument("--steps", type=_positive, default=None, help="override schedule.steps for every arm")
    p.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="comma-separated seeds, e.g. 1,2,3 (default: the file's)",
    )
    p.add_argument(
        "--parallel", type=_positive, default=None, help="runs trained at the same time (default 1)"
    )
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
        help="override a base config value (every arm)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help=f"iso-loss and claims reference arm (default: the file's, or {BASELINE})",
    )
    p.add_argument(
        "--last-n", type=_positive, default=None, help="steps whose counts the load metrics sum (100)"
    )
    p.add_argument(
        "--pes-tokens", type=_positive, default=None, help="sampled validation tokens for PES (1024)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="discard earlier runs in OUT instead of continuing them"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only tabulate finished runs: exit 2, touching nothing, if any run would train, resume or "
        "be replaced (a run whose config changed)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines, no table on stdout")
    p.set_defaults(func=compare_main)
