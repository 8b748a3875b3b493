"""Text on local disk through Hugging Face ``datasets`` (``data.hf``), tokenized once and cached.

1. Resolve the inputs: ``data.hf.path`` is a builder name (``json``, ``parquet``, ``text``,
   ``csv``) with ``data_files`` (paths or globs), or a directory written by
   ``Dataset.save_to_disk`` (arrow). Only local files: ``datasets`` runs offline
   (``HF_DATASETS_OFFLINE``), and files that do not exist are a ``DataError``.
2. The cache key hashes the section, the inputs' names, sizes and modification times, and the
   tokenizer file; the cache is an indexed dataset ``CACHE_DIR/hf-KEY.{bin,idx}``.
3. If the cache exists it is opened (``datasets`` is not even imported); otherwise the records'
   ``text_field`` is tokenized (EOS per record) into a dataset of this process's own, whose
   ``.bin`` and then ``.idx`` are renamed to the cache's names. Every rank that misses the cache
   builds it; the bytes are identical, so whichever rename lands last, ``.bin`` and ``.idx``
   agree, and a crash between the two leaves no ``.idx``: the next run builds again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe_dist.data.documents import Document, write_documents
from moe_dist.data.errors import DataError
from moe_dist.data.indexed_dataset import IndexedTokens, data_path, index_path, read_indexed
from moe_dist.data.tokenizer import Tokenizer


def input_files(path: str, data_files: list[str]) -> list[Path]:
    """The local files behind ``data.hf``; a name or glob that matches nothing is a ``DataError``."""
    if Path(path).expanduser().is_dir():
        root = Path(path).expanduser()
        return sorted(p for p in root.rglob("*") if p.is_file())
    if not data_files:
        raise DataError(f"data.hf.data_files: required with data.hf.path {path!r} (local files only)")
    files: list[Path] = []
    for spec in data_files:
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        if not found:
            raise DataError(f"data.hf.data_files: {spec!r} matches no file (only local files are read)")
        files += [p for p in found if p.is_file()]
    return files


def cache_key(hf: Any, files: list[Path], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(json.dumps(hf.model_dump(mode="json"), sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    tok_path = Path(tokenizer.name)
    h.update(tok_path.read_bytes() if tok_path.is_file() else tokenizer.name.encode())
    return h.hexdigest()[:16]


def _records(hf: Any, files: list[Path], cache_dir: Path) -> Iterator[Document]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before datasets is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # slow to import: only when a cache is built

    datasets.disable_progress_bars()
    source = hf.path if Path(hf.path).expanduser().is_dir() else ", ".join(map(str, files))
    try:
        if Path(hf.path).expanduser().is_dir():
            ds = datasets.load_from_disk(str(Path(hf.path).expanduser()))
        else:
            ds = datasets.load_dataset(
                hf.path,
                data_files=[str(f) for f in files],
                split="train",
                cache_dir=str(cache_dir / "datasets"),
            )
    except Exception as exc:  # datasets raises many types; all mean the same here
        raise DataError(f"data.hf: cannot load {source} with datasets ({hf.path!r}): {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if hf.text_field not in ds.column_names:
        raise DataError(
            f"data.hf.text_field: {hf.text_field!r} is not a field of {source} (fields: {ds.column_names})"
        )
    for start, batch in enumerate(ds.iter(batch_size=1024)):
        for i, text in enumerate(batch[hf.text_field]):
            yield Document("" if text is None else str(text), f"{source} record {start * 1024 + i}")


def load_hf(hf: Any, tokenizer: Tokenizer, cache_dir: Path) -> tuple[IndexedTokens, bool]:
    """The tokenized ``data.hf`` corpus and whether it came from the cache."""
    files = input_files(hf.path, list(hf.data_files))
    prefix = cache_dir / f"hf-{cache_key(hf, files, tokenizer)}"
    if index_path(prefix).is_file():
        return read_indexed(prefix), True
    source = f"data.hf ({hf.path}: {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''})"
    own = cache_dir / f".{prefix.name}.{socket.gethostname()}.{os.getpid()}"
    write_documents(_records(hf, files, cache_dir), tokenizer, own, source)
    os.replace(data_path(own), data_path(prefix))
    os.replace(index_path(own), index_path(prefix))
    return read_indexed(prefix), False
