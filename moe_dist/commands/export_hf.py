"""``moe-dist export-hf CHECKPOINT_DIR -o OUT_DIR [--arch mixtral|qwen3_moe|qwen3_moe_lpr]``: a HF model.

``CHECKPOINT_DIR`` is a run directory, its ``checkpoints/`` or one ``step_*`` directory (the
newest usable checkpoint under it is exported). ``OUT_DIR`` gets ``config.json``,
``model.safetensors`` (fp32) and the tokenizer files, loadable with
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` with no network (LPR runs:
``qwen3_moe_lpr``, remote code shipped in ``OUT_DIR``, loaded with ``trust_remote_code=True``)
(``moe_dist/export/hf_export.py``; docs/export.md). What the target cannot express is refused
in one line, exit 2, with nothing written at ``OUT_DIR``.
"""

from __future__ import annotations

import argparse

from moe_dist.export.hf_support import ARCHS, ExportError


def add_export_hf_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-hf",
        help="export a trained run as a Hugging Face transformers model (Mixtral, Qwen3-MoE, LPR)",
        description="Write config.json, model.safetensors and tokenizer files loadable by transformers.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="run directory, checkpoints/ or a step_* dir")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="directory to create")
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="target layout (default: qwen3_moe_lpr for lpr routers, qwen3_moe with QK-norm, else mixtral)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.set_defaults(func=export_hf_main)


def export_hf_main(args: argparse.Namespace) -> int:
    """ExportError (bad input) reaches ``cli.main``: one line, exit 2."""
    try:
        from moe_dist.export.hf_export import export_hf
    except ModuleNotFoundError as exc:
        if exc.name != "safetensors":
            raise
        raise ExportError("export-hf needs safetensors: pip install 'moe_dist[hf]'") from None
    result = export_hf(args.checkpoint, args.output, args.arch, overwrite=args.overwrite)
    print(
        f"wrote {result.out_dir} ({result.arch}, step {result.step} from {result.checkpoint}): "
        + ", ".join(result.files)
    )
    remote = ", trust_remote_code=True" if result.arch == "qwen3_moe_lpr" else ""
    print(f"load it with: transformers.AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r}{remote})")
    return 0
