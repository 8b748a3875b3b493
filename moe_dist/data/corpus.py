"""Byte-level training data: a corpus of tokens, split into train and validation, sampled per rank.

Tokens are bytes (vocabulary 256): nothing to download, nothing to train. Sources, in order:

- ``data.paths: []``: the Python standard library's own source (``*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, sorted, without site-packages), capped at ``data.max_bytes``.
- text files, directories (every non-hidden file below, sorted) and globs, concatenated.
- one token file ``NAME.bin`` with its header ``NAME.bin.json`` (``moe-dist prepare-data`` writes
  them; uint8 or uint16 tokens), memory-mapped, for corpora larger than memory.

Split: text corpora are split by file: a file is validation when a hash of its name falls in
the first ``data.val_fraction`` of the hash range (whole files, the same distribution as
training). When that leaves either side shorter than a sequence (one file, few files) and for
token files, the last ``data.val_fraction`` of the tokens is validation (a fixed byte split).

Sampling: the batch of (step, micro-batch, rank) starts at offsets drawn from a generator seeded
by ``(seed, step, micro, rank)``: every rank reads different batches, no state is kept, and a
resumed run gets exactly the batches it would have had. The rank is the global rank: the ranks
of an EP group process different tokens too (EP is carved out of data parallelism), so EP=2 and
EP=1 (DP=2) on the same 2 ranks see the same data.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_dist.config import DataConfig

HEADER_FORMAT = "moe_dist.tokens"
HEADER_VERSION = 1
_VAL_STREAM = 1 << 30  # seeds validation batches apart from any training step


class DataError(Exception):
    """Unusable data (bad path, empty or too short corpus); the message names the path."""


@dataclass
class Corpus:
    tokens: np.ndarray  # 1-D uint8/uint16, maybe a memmap
    source: str  # what was read, for messages
    vocab_size: int = 256
    val_start: int | None = None  # tokens[val_start:] are whole validation files (text corpora)


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


def _read_files(files: list[Path], max_bytes: int | None, val_fraction: float, source: str) -> Corpus:
    """Read files in order up to ``max_bytes``; training files first, then validation files."""
    chunks, val_chunks, total = [], [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise DataError(f"data.paths: cannot read {str(f)!r}: {exc.strerror}") from None
        if max_bytes is not None:
            data = data[: max_bytes - total]
        (val_chunks if is_validation_file(f, val_fraction) else chunks).append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    train = b"".join(chunks)
    tokens = np.frombuffer(train + b"".join(val_chunks), dtype=np.uint8)
    return Corpus(tokens=tokens, source=source, val_start=len(train))


def read_token_file(path: Path) -> Corpus:
    """Memory-map a ``.bin`` token file after checking its JSON header."""
    header_path = Path(str(path) + ".json")
    if not header_path.is_file():
        raise DataError(f"data.paths: token file {str(path)!r} has no header {str(header_path)!r}")
    try:
        header = json.loads(header_path.read_text())
        dtype = np.dtype(header["dtype"])
        num_tokens, vocab = int(header["num_tokens"]), int(header["vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"data.paths: bad header {str(header_path)!r}: {exc}") from None
    if header.get("format") != HEADER_FORMAT or dtype not in (np.uint8, np.uint16):
        raise DataError(f"data.paths: {str(header_path)!r} is not a moe_dist token header (uint8/uint16)")
    expected = num_tokens * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(
            f"data.paths: {str(path)!r} has {path.stat().st_size} bytes, "
            f"its header says {expected} (truncated?)"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,)) if num_tokens else np.zeros(0, dtype)
    return Corpus(tokens=tokens, source=str(path), vocab_size=vocab)


def check_paths(cfg: DataConfig) -> None:
    """Raise ``DataError`` for a ``data.paths`` entry that names nothing (reads no data)."""
    for spec in cfg.paths:
        if spec.endswith(".bin"):
            p = Path(spec).expanduser()
            if not p.is_file():
                raise DataError(f"data.paths: {spec!r} does not exist")
            read_token_file(p)
        else:
            expand_paths(spec)


def load_corpus(cfg: DataConfig) -> Corpus:
    if not cfg.paths:
        files = stdlib_files()
        source = f"Python standard library ({sysconfig.get_paths()['stdlib']})"
        if not files:
            raise DataError(f"data.paths: empty, and no *.py files under {source}; set data.paths")
        return _read_files(files, cfg.max_bytes, cfg.val_fraction, source)
    bins = [p for p in cfg.paths if p.endswith(".bin")]
    if bins:
        if len(cfg.paths) != 1:
            raise DataError(f"data.paths: a .bin token file must be the only entry, got {cfg.paths}")
        p = Path(bins[0]).expanduser()
        if not p.is_file():
            raise DataError(f"data.paths: {bins[0]!r} does not exist")
        corpus = read_token_file(p)
        if cfg.max_bytes is not None:
            corpus.tokens = corpus.tokens[: cfg.max_bytes // corpus.tokens.itemsize]
        return corpus
    files = [f for spec in cfg.paths for f in expand_paths(spec)]
    return _read_files(files, cfg.max_bytes, cfg.val_fraction, ", ".join(cfg.paths))


class TokenBatches:
    """Train/validation batches of ``[B, S]`` inputs and next-token targets for one rank."""

    def __init__(self, corpus: Corpus, cfg: DataConfig, seed: int, vocab_size: int) -> None:
        n, need = len(corpus.tokens), cfg.seq_len + 1
        if n == 0:
            raise DataError(f"data.paths: corpus {corpus.source} is empty")
        if corpus.vocab_size > vocab_size:
            raise DataError(
                f"data.paths: {corpus.source} has vocab_size {corpus.vocab_size} "
                f"> model.vocab_size ({vocab_size})"
            )
        split = corpus.val_start
        if split is None or min(split, n - split) < need:  # no file split (or too few files): bytes
            split = n - int(n * cfg.val_fraction)
        self.train, self.val = corpus.tokens[:split], corpus.tokens[split:]
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) < need:
                raise DataError(
                    f"data.paths: corpus {corpus.source} too short: its {name} split has {len(part)} tokens, "
                    f"need at least data.seq_len + 1 = {need} (add data or lower data.seq_len)"
                )
        self.cfg, self.seed, self.source = cfg, seed, corpus.source

    def _batch(self, tokens: np.ndarray, key: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        S, B = self.cfg.seq_len, self.cfg.micro_batch_size
        starts = np.random.default_rng(key).integers(0, len(tokens) - S, size=B)
        rows = np.stack([np.asarray(tokens[s : s + S + 1], dtype=np.int64) for s in starts])
        xy = torch.from_numpy(rows)
        return xy[:, :-1], xy[:, 1:]

    def train_batch(self, step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.train, [self.seed, step, micro, rank])

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch ``index`` of a fixed set, the same whatever the world size."""
        return self._batch(self.val, [self.seed, _VAL_STREAM, index])


# ---------------------------------------------------------------- moe-dist prepare-data


def write_token_file(files: list[Path], out: Path, dtype: str = "uint8") -> dict:
    """Concatenate the bytes of ``files`` into ``out`` (+ ``out.json`` header), streaming."""
    out.parent.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with open(tmp, "wb") as fh:
        for f in files:
            data = np.frombuffer(f.read_bytes(), dtype=np.uint8)
            fh.write(data.astype(np_dtype).tobytes())
            count += len(data)
    header = {
        "format": HEADER_FORMAT,
        "version": HEADER_VERSION,
        "dtype": np_dtype.name,
        "vocab_size": 256,
        "num_tokens": count,
        "tokenizer": "bytes",
        "sources": [str(f) for f in files[:1000]],
    }
    os.replace(tmp, out)
    Path(str(out) + ".json").write_text(json.dumps(header, indent=1) + "\n")
    return header
