"""``moe-dist import-hf HF_DIR -o RUN_DIR [--router NAME] [--set k=v ...]``: a run from a HF checkpoint.

``HF_DIR`` holds a Mixtral or Qwen3-MoE checkpoint as ``transformers`` writes it (``config.json``,
``model.safetensors`` or shards with ``model.safetensors.index.json``, tokenizer files).
``RUN_DIR`` gets ``config.yaml`` (and ``config.json``), ``tokenizer/`` and a checkpoint at step
0; ``moe-dist train RUN_DIR/config.yaml --resume`` continues it at any EP and DP size.
``--router NAME`` replaces the checkpoint's router with one of our plugins, initialised as the
plugin says (experts and attention are imported). What we cannot express is refused in one
line, exit 2, with nothing written at ``RUN_DIR`` (``moe_dist/export/hf_import.py``;
docs/export.md).
"""

from __future__ import annotations

import argparse

from moe_dist.export.hf_support import ExportError


def add_import_hf_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-hf",
        help="start a run from a Hugging Face Mixtral or Qwen3-MoE checkpoint (optionally with our router)",
        description="Write a moe_dist run directory (config.yaml, tokenizer, checkpoint at step 0) "
        "from a local Hugging Face checkpoint.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and safetensors files")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument(
        "--router",
        metavar="NAME",
        default=None,
        help="replace the router with this plugin (e.g. lpr), initialised as the plugin says",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=import_hf_main)


def import_hf_main(args: argparse.Namespace) -> int:
    """HFImportError, ConfigError, DataError (bad input) reach ``cli.main``: one line, exit 2."""
    try:
        from moe_dist.export.hf_import import import_hf
    except ModuleNotFoundError as exc:
        if exc.name != "safetensors":
            raise
        raise ExportError("import-hf needs safetensors: pip install 'moe_dist[hf]'") from None
    r = import_hf(args.hf_dir, args.output, args.router, args.set)
    print(
        f"wrote {r.run_dir} ({r.arch}, {r.parameters:,} parameters): checkpoint {r.step_dir.name} "
        f"({r.format} format); router {r.router}; tokenizer {r.tokenizer}"
    )
    for note in r.notes:
        print(f"note: {note}")
    print(f"continue with: moe-dist train {r.run_dir / 'config.yaml'} --resume [--set parallel.ep_size=N]")
    return 0
