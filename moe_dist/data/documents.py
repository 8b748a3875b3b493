"""Documents from local files, tokenized with EOS, into an indexed dataset (``prepare-data``'s core).

1. ``iter_documents(files, text_field)``: one document per file, or one per record of a
   ``.jsonl`` file (its ``text_field``); a record without the field, or a line that is not
   JSON, is a ``DataError`` naming the file and line.
2. ``write_documents(docs, tokenizer, prefix)``: tokenizes batches of documents
   (``encode_batch``), appends EOS to each (when the tokenizer has one), skips empty documents,
   and writes ``PREFIX.bin`` + ``PREFIX.idx`` atomically (``IndexedDatasetWriter``). No
   non-empty document at all is a ``DataError``, and nothing is left at PREFIX.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_dist.data.errors import DataError
from moe_dist.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from moe_dist.data.tokenizer import Tokenizer

ENCODE_BATCH = 1024  # documents per encode_batch call: enough to keep the thread pool busy


@dataclass
class Document:
    text: str
    origin: str  # "file" or "file:line", for messages


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror}") from None


def iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    try:
        fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 -- closed by the with below
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    with fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{str(path)!r} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{str(path)!r} line {number} has no field {text_field!r} (it has {keys})")
            yield Document(str(record[text_field]), f"{path}:{number}")


def iter_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[Document]:
    for path in files:
        if path.suffix == ".jsonl":
            yield from iter_jsonl(path, text_field)
        else:
            yield Document(read_text(path), str(path))


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class WriteReport:
    prefix: Path
    documents: int
    tokens: int
    skipped_empty: int
    dtype: np.dtype


def write_documents(
    docs: Iterable[Document], tokenizer: Tokenizer, prefix: Path, source: str, batch_size: int = ENCODE_BATCH
) -> WriteReport:
    """Tokenize ``docs`` (EOS after each) into ``PREFIX.bin`` + ``PREFIX.idx``; ``source`` names the
    inputs in the error for an empty corpus."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    skipped = 0
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for batch in _batches(docs, batch_size):
            texts = [d.text for d in batch if d.text]
            skipped += len(batch) - len(texts)
            for ids in tokenizer.encode_batch(texts):
                writer.add_document(ids + eos)
        if writer.num_documents == 0:
            raise DataError(f"{source}: no non-empty documents ({skipped} empty); nothing written")
    return WriteReport(prefix, writer.num_documents, writer.num_tokens, skipped, dtype)
