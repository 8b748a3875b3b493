"""``moe-dist check CONFIG [--set k=v ...] [--world-size N]``: validate without training.

Prints the resolved config (defaults filled in, plugin sections expanded) as YAML, or every
error at once with its dotted path (exit code 2).
"""

from __future__ import annotations

import argparse
import os

import yaml

from moe_dist.config import check_world_size, config_to_dict, load_config
from moe_dist.data.corpus import check_paths


def add_check_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="validate a config and print it resolved, without training")
    p.add_argument("config", help="YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "0")) or None,
        help="also check that the config fits this many processes",
    )
    p.set_defaults(func=check_main)


def check_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.world_size:
        check_world_size(cfg, args.world_size)
    check_paths(cfg.data, cfg.model.vocab_size)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print(f"# {args.config}: OK", flush=True)
    return 0
