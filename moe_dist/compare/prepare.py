"""The data a comparison file's ``compare.prepare`` asks for, made once and reused.

1. ``DIR/tokenizer.json``: a byte-level BPE of ``vocab_size`` trained on the inputs
   (``data.tokenizer.train_bpe``, as ``moe-dist train-tokenizer``).
2. ``DIR/corpus.{bin,idx}``: the inputs tokenized into a Megatron indexed dataset, EOS after each
   document (``data.documents.write_documents``, as ``moe-dist prepare-data``).
3. ``DIR/prepared.json`` records the inputs (files and sizes) and the vocabulary; when it
   matches, nothing is redone. Every file is written atomically, the stamp last.
4. The base config then reads ``data.paths: [DIR/corpus]`` with that tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moe_dist.compare.presets import PrepareSpec
from moe_dist.data.corpus import expand_paths
from moe_dist.data.documents import iter_documents, write_documents
from moe_dist.data.errors import DataError
from moe_dist.data.tokenizer import HFTokenizer, train_bpe


def _inputs(spec: PrepareSpec) -> list[Path]:
    try:
        return [f for entry in spec.inputs for f in expand_paths(entry)]
    except DataError as exc:
        hint = f" ({spec.install_hint})" if spec.install_hint else ""
        raise DataError(f"compare.prepare.inputs: {exc}{hint}") from None


def prepared_data_config(spec: PrepareSpec) -> dict[str, Any]:
    """The ``data`` overrides that read the prepared corpus (whether or not it is made yet)."""
    out = Path(spec.dir)
    return {"paths": [str(out / "corpus")], "tokenizer": {"kind": "hf", "path": str(out / "tokenizer.json")}}


def prepare_data(spec: PrepareSpec, say: Any = print) -> dict[str, Any]:
    """Make (or reuse) the tokenizer and corpus; returns the ``data`` overrides for the base."""
    out = Path(spec.dir)
    files = _inputs(spec)
    stamp = {
        "vocab_size": spec.vocab_size,
        "inputs": spec.inputs,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
    }
    tok_path, prefix, stamp_path = out / "tokenizer.json", out / "corpus", out / "prepared.json"
    overrides = prepared_data_config(spec)
    try:
        saved = json.loads(stamp_path.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return overrides
    except (OSError, ValueError):
        pass
    say(f"preparing data in {out}: BPE {spec.vocab_size} on {len(files)} files ({stamp['bytes']:,} bytes)")
    texts = [d.text for d in iter_documents(files) if d.text]
    train_bpe(texts, spec.vocab_size, tok_path)
    report = write_documents(iter_documents(files), HFTokenizer(tok_path), prefix, f"compare.prepare {out}")
    tmp = stamp_path.with_name(f".{stamp_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stamp | {"documents": report.documents, "tokens": report.tokens}))
    say(f"prepared {report.documents:,} documents, {report.tokens:,} tokens")
    os.replace(tmp, stamp_path)
    return overrides
