"""Training corpora: the sources ``data`` names, each a token stream with its document bounds.

Sources (``load_corpus``), one ``Corpus`` per blend entry:

- ``data.paths: []`` and no ``data.hf``: the Python standard library's own source (``*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, sorted, without site-packages), capped at ``data.max_bytes``.
- text files, directories (every non-hidden file below, sorted) and globs: one document per file,
  tokenized by ``data.tokenizer`` (bytes: joined as they are; a BPE: EOS after each file).
- Megatron indexed datasets, named by their ``PREFIX`` (``PREFIX.bin`` + ``PREFIX.idx``, as
  ``moe-dist prepare-data`` or Megatron-LM's ``preprocess_data.py`` write them), memory-mapped.
- ``data.hf``: local files through Hugging Face ``datasets``, tokenized once into an indexed
  dataset cached in the run's ``data_cache/`` (``hf_source``).

Blend: Megatron's ``--data-path`` syntax, ``[0.3, A, 0.7, B]`` (or ``"0.3 A"`` entries): every
entry its own corpus, sampled with its weight. Without weights all text entries form one
corpus and each indexed dataset another, weighted by their token counts (as if concatenated).

Split: text corpora are split by file: a file is validation when a hash of its name falls in
the first ``data.val_fraction`` of the hash range (whole files, the same distribution as
training). Indexed and ``datasets`` corpora are split by document: the last
``data.val_fraction`` of the documents. When that leaves either side shorter than a sequence
(one file, few documents) the last ``data.val_fraction`` of the tokens is validation.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_dist.config import DataConfig
from moe_dist.data.errors import DataError
from moe_dist.data.indexed_dataset import IndexedTokens, is_indexed_prefix, read_indexed
from moe_dist.data.tokenizer import Tokenizer, check_model_vocab, load_tokenizer


@dataclass
class Corpus:
    """One token stream: ``tokens`` (1-D, maybe a memmap), ``doc_bounds`` (``int64[D + 1]``
    document start offsets, ``len(tokens)`` last), and where validation starts if the source
    decides it (whole validation files at the end of a text corpus)."""

    tokens: np.ndarray
    doc_bounds: np.ndarray
    source: str  # what was read, for messages
    vocab_size: int | None  # the tokenizer's, when this corpus was tokenized here
    val_start: int | None = None
    weight: float | None = None  # blend weight; None = by token count
    indexed: bool = False  # ids written elsewhere: checked against model.vocab_size at load


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def expand_paths(path_spec: str) -> list[Path]:
    """Files named by one ``data.paths`` entry (file, directory or glob); errors name the entry."""
    if any(c in path_spec for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(path_spec), recursive=True))
        files = [p for p in found if p.is_file()]
        if not files:
            raise DataError(f"data.paths: no files match {path_spec!r}")
        return files
    p = Path(path_spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"data.paths: directory {str(p)!r} has no files")
        return files
    raise DataError(f"data.paths: {path_spec!r} does not exist")


def is_validation_file(path: Path, val_fraction: float) -> bool:
    """A file's split, from a hash of its name: stable across machines, reorderings and caps."""
    return zlib.crc32(path.name.encode()) % 1_000_000 < val_fraction * 1_000_000


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(paths: list[str]) -> list[tuple[float | None, str]]:
    """``data.paths`` as (weight, entry) pairs: Megatron's flat ``[w1, p1, w2, p2]`` or ``"w p"``."""
    out: list[tuple[float | None, str]] = []
    i = 0
    while i < len(paths):
        entry, weight = paths[i], _number(paths[i])
        if weight is not None:
            if i + 1 == len(paths):
                raise DataError(f"data.paths: weight {entry} is not followed by a path")
            out.append((weight, paths[i + 1]))
            i += 2
            continue
        head, _, rest = entry.partition(" ")
        weight = _number(head)
        out.append((weight, rest.strip()) if weight is not None and rest.strip() else (None, entry))
        i += 1
    weights = [w for w, _ in out]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise DataError(f"data.paths: give every entry a weight or none, got {paths}")
    if any(w is not None and w <= 0 for w in weights):
        raise DataError(f"data.paths: blend weights must be > 0, got {paths}")
    return out


def indexed_prefix(spec: str) -> str | None:
    """The ``PREFIX`` of an indexed-dataset entry (``PREFIX``, ``PREFIX.bin``, ``PREFIX.idx``), or None."""
    expanded = os.path.expanduser(spec)
    if expanded.endswith((".bin", ".idx")):
        return expanded[:-4]
    if Path(expanded).exists() or any(c in spec for c in "*?["):
        return None
    return expanded if is_indexed_prefix(expanded) else None


def _read_files(
    files: list[Path], tokenizer: Tokenizer, max_bytes: int | None, val_fraction: float, source: str
) -> Corpus:
    """Read files in order up to ``max_bytes``; training files first, then validation files."""
    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise DataError(f"data.paths: cannot read {str(f)!r}: {exc.strerror}") from None
        if max_bytes is not None:
            data = data[: max_bytes - total]
        (val if is_validation_file(f, val_fraction) else train).append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    docs = train + val
    if tokenizer.eos_id is None:  # bytes: the files' bytes as they are
        parts = [np.frombuffer(d, dtype=np.uint8) for d in docs]
    else:
        encoded = tokenizer.encode_batch([d.decode("utf-8", errors="replace") for d in docs])
        parts = [np.asarray(ids + [tokenizer.eos_id], dtype=np.int32) for ids in encoded]
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)])
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return Corpus(tokens, bounds, source, tokenizer.vocab_size, val_start=int(bounds[len(train)]))


def _from_indexed(data: IndexedTokens, source: str, max_bytes: int | None) -> Corpus:
    tokens, bounds = data.tokens, data.doc_bounds
    if max_bytes is not None and max_bytes // tokens.itemsize < len(tokens):
        tokens = tokens[: max_bytes // tokens.itemsize]
        bounds = np.append(bounds[bounds < len(tokens)], len(tokens))
    return Corpus(tokens, bounds, source, vocab_size=None, indexed=True)


def _load_entries(cfg: DataConfig, tokenizer: Tokenizer) -> list[Corpus]:
    blend = parse_blend(cfg.paths)
    weighted = blend[0][0] is not None
    corpora: list[Corpus] = []
    text_specs: list[str] = []
    for weight, spec in blend:
        prefix = indexed_prefix(spec)
        if prefix is not None:
            corpora.append(_from_indexed(read_indexed(prefix), f"{prefix}.bin", cfg.max_bytes))
            corpora[-1].weight = weight
            if tokenizer.eos_id is not None:  # a tokenizer named: the model must cover its vocabulary
                corpora[-1].vocab_size = tokenizer.vocab_size
        elif weighted:
            files = expand_paths(spec)
            corpora.append(_read_files(files, tokenizer, cfg.max_bytes, cfg.val_fraction, spec))
            corpora[-1].weight = weight
        else:
            text_specs.append(spec)
    if text_specs:  # unweighted text entries: one corpus, as if one directory
        files = [f for spec in text_specs for f in expand_paths(spec)]
        corpora.insert(
            0, _read_files(files, tokenizer, cfg.max_bytes, cfg.val_fraction, ", ".join(text_specs))
        )
    return corpora


def load_corpus(cfg: DataConfig, cache_dir: Path | None = None) -> list[Corpus]:
    """Every corpus ``cfg`` names; ``cache_dir`` holds the ``data.hf`` cache (required with it)."""
    tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    if cfg.hf is not None:
        from moe_dist.data.hf_source import load_hf

        if cache_dir is None:
            raise DataError("data.hf: needs a cache directory (the run directory)")
        data, cached = load_hf(cfg.hf, tokenizer, cache_dir)
        source = f"data.hf {cfg.hf.path} ({'cached' if cached else 'tokenized'} at {data.prefix})"
        corpus = _from_indexed(data, source, cfg.max_bytes)
        corpus.vocab_size = tokenizer.vocab_size
        return [corpus]
    if cfg.paths:
        return _load_entries(cfg, tokenizer)
    files = stdlib_files()
    source = f"Python standard library ({sysconfig.get_paths()['stdlib']})"
    if not files:
        raise DataError(f"data.paths: empty, and no *.py files under {source}; set data.paths")
    return [_read_files(files, tokenizer, cfg.max_bytes, cfg.val_fraction, source)]


def check_paths(cfg: DataConfig, model_vocab_size: int) -> None:
    """Raise ``DataError`` for a tokenizer (or one larger than ``model.vocab_size``) or a ``data``
    entry that names nothing; reads no text."""
    tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    check_model_vocab(tokenizer.vocab_size, model_vocab_size, tokenizer.name)
    for _, spec in parse_blend(cfg.paths):
        prefix = indexed_prefix(spec)
        if prefix is not None:
            read_indexed(prefix)
        else:
            expand_paths(spec)
    if cfg.hf is not None:
        from moe_dist.data.hf_source import input_files

        input_files(cfg.hf.path, list(cfg.hf.data_files))
