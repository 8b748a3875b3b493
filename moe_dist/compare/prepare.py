"""The data a comparison file's ``compare.prepare`` asks for, made once and reused.

1. ``DIR/tokenizer.json``: a byte-level BPE of ``vocab_size`` trained on the inputs
   (``data.tokenizer.train_bpe``, as ``moe-dist train-tokenizer``).
2. ``DIR/corpus.{bin,idx}``: the inputs tokenized into a Megatron indexed dataset, EOS after each
   document (``data.documents.write_documents``, as ``moe-dist prepare-data``). The training
   reads validation from the LAST ``data.val_fraction`` of the documents, so inputs from several
   sources take ``shuffle_files: true``: the files in the order of a SHA-256 of their path (the
   same on every machine), so the held-out documents are a sample of every source, not the last
   package's.
3. ``DIR/prepared.json`` records the inputs (files and sizes) and the vocabulary; when it
   matches, nothing is redone. Every file is written atomically, the stamp last.
4. The base config then reads ``data.paths: [DIR/corpus]`` with that tokenizer.
5. On a machine without the inputs (a GPU machine with no package index, the data carried
   there already prepared): a stamp with the same ``vocab_size`` and ``inputs`` and both data
   files present is used as it is, with a note that the input files could not be re-checked.

``python -m moe_dist.compare.prepare CONFIG...`` prepares the data of comparison files without
training anything (``tools/gpu_compare.sh --prepare`` does that before a GPU run).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from moe_dist.compare.presets import PrepareSpec, split_compare_file
from moe_dist.config import ConfigError
from moe_dist.data.corpus import expand_paths
from moe_dist.data.documents import iter_documents, write_documents
from moe_dist.data.errors import DataError
from moe_dist.data.tokenizer import HFTokenizer, train_bpe


def _inputs(spec: PrepareSpec) -> list[Path]:
    try:
        files = [f for entry in spec.inputs for f in expand_paths(entry)]
    except DataError as exc:
        hint = f" ({spec.install_hint})" if spec.install_hint else ""
        raise DataError(f"compare.prepare.inputs: {exc}{hint}") from None
    if spec.shuffle_files:
        files.sort(key=lambda f: hashlib.sha256(str(f).encode()).hexdigest())
    return files


def prepared_data_config(spec: PrepareSpec) -> dict[str, Any]:
    """The ``data`` overrides that read the prepared corpus (whether or not it is made yet)."""
    out = Path(spec.dir)
    return {"paths": [str(out / "corpus")], "tokenizer": {"kind": "hf", "path": str(out / "tokenizer.json")}}


def _carried(spec: PrepareSpec) -> dict[str, Any] | None:
    """The stamp of data prepared elsewhere for the same spec, when its files are all here."""
    out = Path(spec.dir)
    try:
        saved = json.loads((out / "prepared.json").read_text())
    except (OSError, ValueError):
        return None
    files_here = all((out / f).is_file() for f in ("tokenizer.json", "corpus.bin", "corpus.idx"))
    same = (saved.get("vocab_size"), saved.get("inputs"), saved.get("shuffle_files", False)) == (
        spec.vocab_size,
        spec.inputs,
        spec.shuffle_files,
    )
    return saved if same and files_here else None


def prepare_data(spec: PrepareSpec, say: Any = print) -> dict[str, Any]:
    """Make (or reuse) the tokenizer and corpus; returns the ``data`` overrides for the base."""
    out = Path(spec.dir)
    try:
        files = _inputs(spec)
    except DataError:
        carried = _carried(spec)
        if carried is None:
            raise
        say(
            f"using the data prepared in {out} ({carried.get('tokens', 0):,} tokens); its inputs "
            "are not on this machine, so they were not re-checked"
        )
        return prepared_data_config(spec)
    stamp = {
        "vocab_size": spec.vocab_size,
        "inputs": spec.inputs,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
    }
    if spec.shuffle_files:  # only then: stamps made before the option still match
        stamp["shuffle_files"] = True
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


def main(argv: list[str] | None = None) -> int:
    """Prepare the ``compare.prepare`` data of each comparison file named; exit 2 on bad input."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m moe_dist.compare.prepare CONFIG...", file=sys.stderr)
        return 2
    for path in paths:
        try:
            spec = split_compare_file(path)[1].prepare
            if spec is None:
                print(f"{path}: no compare.prepare section, nothing to prepare")
                continue
            prepare_data(spec, say=lambda m, p=path: print(f"{p}: {m}"))
            print(f"{path}: data ready in {spec.dir}")
        except (ConfigError, DataError) as exc:
            errors = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
            print(f"error: {path}: " + "; ".join(errors), file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
