"""``moe-dist``: the command line. Thin: each subcommand lives in its own module.

A subcommand module provides ``add_<name>_parser(subparsers)``, which registers its arguments
and sets ``func`` (``func(args) -> exit code``). Adding one is one line in ``SUBCOMMANDS``.

Bad input (config, data, checkpoint, launch environment) ends with one clear message on stderr
and exit code 2, never a traceback; a collective that loses its peer mid-run, with one line
naming it and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (module, function that adds the subparser), in the order ``--help`` lists them.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("moe_dist.commands.train", "add_train_parser"),
    ("moe_dist.commands.check", "add_check_parser"),
    ("moe_dist.commands.demo", "add_demo_parser"),
    ("moe_dist.commands.prepare_data", "add_prepare_data_parser"),
    ("moe_dist.commands.train_tokenizer", "add_train_tokenizer_parser"),
    ("moe_dist.commands.compare", "add_compare_parser"),
    ("moe_dist.commands.launch", "add_launch_parser"),
    ("moe_dist.commands.export_hf", "add_export_hf_parser"),
    ("moe_dist.commands.import_hf", "add_import_hf_parser"),
    ("moe_dist.commands.generate", "add_generate_parser"),
    ("moe_dist.commands.export_tb", "add_export_tb_parser"),
]

EXIT_BAD_INPUT = 2
EXIT_LOST_PEER = 1  # a peer died or became unreachable mid-run (moe_dist/parallel/lost_peer.py)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist", description="Expert-parallel Mixture-of-Experts training with pluggable routers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, adder in SUBCOMMANDS:
        getattr(importlib.import_module(module), adder)(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from moe_dist.config import ConfigError
    from moe_dist.data.errors import DataError
    from moe_dist.export.hf_support import ExportError
    from moe_dist.models.generation import GenerationError
    from moe_dist.parallel.startup import LaunchEnvError
    from moe_dist.training.checkpoint_choice import CheckpointError

    return ConfigError, DataError, CheckpointError, LaunchEnvError, ExportError, GenerationError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        # Every rank hits the same config/data error: one copy per host is enough (local rank 0,
        # so a host whose own setup is wrong still says why, under any launcher)
        if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0":
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a collective lost its peer: one line per rank, not a traceback
        from moe_dist.parallel.lost_peer import lost_peer_message

        message = lost_peer_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_LOST_PEER


if __name__ == "__main__":
    sys.exit(main())
