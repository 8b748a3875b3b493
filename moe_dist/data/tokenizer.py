"""Tokenizers: raw bytes (vocabulary 256, no EOS) or a Hugging Face ``tokenizers`` file.

1. ``load_tokenizer(cfg)`` builds the ``data.tokenizer`` section's tokenizer: ``kind: bytes``
   (today's default, nothing to train) or ``kind: hf`` with ``path: tokenizer.json``; a missing
   file or one that is not a tokenizer is a ``DataError`` naming it.
2. ``encode_batch(texts)`` tokenizes many documents at once (``tokenizers`` spreads a batch over
   its Rust thread pool); ``decode(ids)`` goes back to text.
3. ``train_bpe(texts, vocab_size, out)`` trains a byte-level BPE (GPT-2's pre-tokenizer and
   decoder) on documents with ``<|endoftext|>`` as its EOS, the token ``prepare-data`` appends to
   every document.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from moe_dist.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# EOS spellings of common tokenizer files, looked up when a file is not one of ours.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """A token per byte; no EOS (all 256 ids are bytes), so documents are simply joined."""

    name = "bytes"
    vocab_size = 256
    eos_id: int | None = None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``, with its EOS id."""

    def __init__(self, path: str | Path, parallel: bool = True) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"data.tokenizer.path: tokenizer file {str(path)!r} does not exist")
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for any unparsable file
            raise DataError(f"data.tokenizer.path: {str(path)!r} is not a tokenizers file: {exc}") from None
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = (self._tok.token_to_id(t) for t in _EOS_CANDIDATES)
        self.eos_id = next((i for i in ids if i is not None), None)
        if self.eos_id is None:
            raise DataError(f"data.tokenizer.path: {str(path)!r} has no EOS token (one of {_EOS_CANDIDATES})")
        self.parallel = parallel

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # TOKENIZERS_PARALLELISM is read by the Rust side at each call: off = one thread.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.parallel else "false"
        # _fast: no character offsets, which we never read
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def check_model_vocab(vocab_size: int, model_vocab_size: int, source: str) -> None:
    """A model smaller than the vocabulary it is fed is an error naming both numbers."""
    if vocab_size > model_vocab_size:
        raise DataError(
            f"model.vocab_size ({model_vocab_size}) is smaller than the vocabulary of {source} "
            f"({vocab_size}); set model.vocab_size >= {vocab_size}"
        )


def load_tokenizer(kind: str, path: str | None) -> Tokenizer:
    """The tokenizer of ``data.tokenizer`` (``kind`` bytes or hf, ``path`` for hf)."""
    if kind == "bytes":
        return ByteTokenizer()
    if not path:
        raise DataError("data.tokenizer.path: required for kind 'hf' (a tokenizer.json file)")
    return HFTokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` (documents) and write it to ``out`` (atomically)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    return HFTokenizer(out)
