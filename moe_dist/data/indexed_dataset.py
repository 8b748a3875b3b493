"""Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), read and written without megatron-core.

The layout of megatron-core's ``megatron/core/datasets/indexed_dataset.py`` (what Megatron-LM's
``tools/preprocess_data.py`` writes), little-endian:

- ``PREFIX.bin``: the tokens of every sequence, back to back, in one dtype.
- ``PREFIX.idx``: ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B`` (1 uint8, 2 int8,
  3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), sequence count N ``<Q``,
  document-index count D+1 ``<Q``, then ``int32[N]`` sequence lengths, ``int64[N]`` byte offsets
  of the sequences in ``.bin``, ``int64[D+1]`` document indices (sequence index where each
  document starts, 0 first, N last).

We write one sequence per document (what ``preprocess_data.py`` does without sentence
splitting), uint16 when the vocabulary has fewer than 65500 ids and int32 otherwise (Megatron's
``DType.optimal_dtype``).

Writing is atomic: ``IndexedDatasetWriter`` fills hidden temporary files and, only when closed
without an error, removes any old ``PREFIX.idx``, renames the ``.bin`` and then the ``.idx``
into place. An interrupted run leaves at most a ``.bin`` with no ``.idx``, which the reader
refuses, never a pair that looks complete.

Shape legend: N sequences, D documents.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_dist.data.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_INTEGER_CODES = {1, 2, 3, 4, 5, 8}
_FIXED_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D + 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65500 ids, int32 above."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def index_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def data_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


@dataclass
class IndexedTokens:
    """An opened dataset: ``tokens`` (memory-mapped, all sequences back to back) and
    ``doc_bounds`` (``int64[D + 1]`` token offsets where each document starts, total last)."""

    prefix: str
    tokens: np.ndarray
    doc_bounds: np.ndarray

    @property
    def num_documents(self) -> int:
        return len(self.doc_bounds) - 1


def read_indexed(prefix: str | Path) -> IndexedTokens:
    """Open ``PREFIX.bin`` + ``PREFIX.idx`` after checking that they agree; errors name the file."""
    idx, bin_ = index_path(prefix), data_path(prefix)
    if not idx.is_file():
        hint = " (an interrupted prepare-data?)" if bin_.is_file() else ""
        raise DataError(f"data.paths: {str(bin_)!r} has no index {str(idx)!r}{hint}")
    if not bin_.is_file():
        raise DataError(f"data.paths: index {str(idx)!r} has no data file {str(bin_)!r}")
    raw = idx.read_bytes()
    if len(raw) < _FIXED_HEADER.size:
        raise DataError(f"data.paths: {str(idx)!r} is not a Megatron index (only {len(raw)} bytes)")
    magic, version, code, n_seq, n_doc = _FIXED_HEADER.unpack_from(raw)
    if magic != INDEX_HEADER or version != INDEX_VERSION:
        raise DataError(
            f"data.paths: {str(idx)!r} is not a Megatron index (header {magic!r}, version {version})"
        )
    if code not in _INTEGER_CODES:
        raise DataError(f"data.paths: {str(idx)!r} has dtype code {code}, not an integer token type")
    dtype = _CODE_DTYPES[code]
    offset = _FIXED_HEADER.size
    need = offset + n_seq * (4 + 8) + n_doc * 8
    if len(raw) < need:
        raise DataError(f"data.paths: {str(idx)!r} is truncated ({len(raw)} bytes, its counts need {need})")
    lengths_N = np.frombuffer(raw, np.int32, n_seq, offset)
    doc_index = np.frombuffer(raw, np.int64, n_doc, offset + n_seq * 12)
    seq_starts = np.concatenate([[0], np.cumsum(lengths_N, dtype=np.int64)])
    num_tokens = int(seq_starts[-1])
    size, expected = bin_.stat().st_size, num_tokens * dtype.itemsize
    if size != expected:
        raise DataError(
            f"data.paths: {str(bin_)!r} has {size} bytes, its index {str(idx)!r} says {expected} "
            f"({num_tokens} {dtype.name} tokens; truncated or from another run?)"
        )
    if n_doc == 0 or doc_index[0] != 0 or doc_index[-1] != n_seq or np.any(np.diff(doc_index) < 0):
        raise DataError(f"data.paths: {str(idx)!r} has inconsistent document indices")
    tokens = np.memmap(bin_, dtype=dtype, mode="r", shape=(num_tokens,)) if num_tokens else np.zeros(0, dtype)
    return IndexedTokens(prefix=str(prefix), tokens=tokens, doc_bounds=seq_starts[doc_index])


def is_indexed_prefix(spec: str) -> bool:
    """Whether a ``data.paths`` entry names an indexed dataset (either file of the pair exists)."""
    return index_path(spec).is_file() or data_path(spec).is_file()


class IndexedDatasetWriter:
    """Stream documents into ``PREFIX.bin`` + ``PREFIX.idx``; use as a context manager.

    1. ``add_document(ids)`` appends one document (one sequence) to a hidden ``.bin`` temporary.
    2. On a clean exit the index is written to its own temporary, then both are renamed into
       place (``.idx`` last); on an exception both temporaries are removed.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".{self.prefix.name}.{os.getpid()}.tmp"
        self._tmp_bin = self.prefix.with_name(tag + ".bin")
        self._tmp_idx = self.prefix.with_name(tag + ".idx")
        self._lengths: list[int] = []
        self.num_tokens = 0
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 -- closed in __exit__

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def add_document(self, ids: np.ndarray | list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(len(arr))
        self.num_tokens += len(arr)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._bin.close()
        if exc_type is not None:
            self._tmp_bin.unlink(missing_ok=True)
            return
        try:
            self._write_index()
            index_path(self.prefix).unlink(missing_ok=True)  # an old .idx must not pair with the new .bin
            os.replace(self._tmp_bin, data_path(self.prefix))
            os.replace(self._tmp_idx, index_path(self.prefix))
        finally:
            self._tmp_bin.unlink(missing_ok=True)
            self._tmp_idx.unlink(missing_ok=True)

    def _write_index(self) -> None:
        n = len(self._lengths)
        lengths_N = np.asarray(self._lengths, dtype=np.int32)
        pointers_N = np.concatenate([[0], np.cumsum(lengths_N[:-1], dtype=np.int64)]) * self.dtype.itemsize
        with open(self._tmp_idx, "wb") as fh:
            fh.write(_FIXED_HEADER.pack(INDEX_HEADER, INDEX_VERSION, DTYPE_CODES[self.dtype], n, n + 1))
            fh.write(lengths_N.tobytes())
            fh.write(pointers_N.astype(np.int64)[:n].tobytes())
            fh.write(np.arange(n + 1, dtype=np.int64).tobytes())  # one sequence per document
