"""Deterministic per-rank batches of packed sequences from one or more corpora.

Shape legend: B micro-batch, S sequence.

1. Setup (``TokenBatches``): each corpus is split into training and validation tokens
   (``corpus`` docstring), checked (long enough, every token id < ``model.vocab_size``, the
   tokenizer no larger than the model's vocabulary), and weighted (its blend weight, or its
   token count).
2. ``train_batch(step, micro, rank)``: a generator seeded by ``(seed, step, micro, rank)`` picks,
   for each of the B rows, a corpus (by weight; skipped with one corpus) and a start offset in
   its training stream. A row is ``S + 1`` consecutive tokens, packed across documents (EOS
   between them): inputs are the first S, targets the last S. No state is kept: a resumed run
   gets exactly the batches it would have had, and every rank reads different ones. The rank is
   the global rank (EP is carved out of data parallelism), so EP=2 and EP=1 (DP=2) on the same 2
   ranks see the same data.
3. With ``data.document_mask``, ``doc_BS`` numbers the document of every input position (0 for
   the row's first document, +1 at each boundary); the model lets a token attend only to tokens
   of its own document.
4. ``val_batch(index)``: the same from the validation streams, seeded apart from any training step,
   so validation batch ``i`` is the same whatever the world size.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from moe_dist.config import Config, DataConfig
from moe_dist.data.corpus import Corpus, load_corpus
from moe_dist.data.errors import DataError
from moe_dist.data.tokenizer import check_model_vocab

_VAL_STREAM = 1 << 30  # seeds validation batches apart from any training step
_MAX_SCAN = 1 << 24  # tokens per chunk when scanning a memory-mapped corpus for its largest id


class Batch(NamedTuple):
    x_BS: torch.Tensor  # int64 inputs
    y_BS: torch.Tensor  # int64 next-token targets
    doc_BS: torch.Tensor | None  # int64 document number per input position (data.document_mask)

    def to(self, device: torch.device | str) -> Batch:
        """On ``device``; to CUDA through pinned memory without blocking the host (a plain
        pageable copy waits for the device to drain: a host synchronisation every step)."""
        if torch.device(device).type != "cuda":
            return self
        ts = [t.pin_memory().to(device, non_blocking=True) if t is not None else None for t in self]
        return Batch(*ts)


class _Stream(NamedTuple):
    tokens: np.ndarray
    doc_bounds: np.ndarray  # document starts within ``tokens`` (may begin below 0: a cut document)


def max_token(tokens: np.ndarray) -> int:
    """The largest id, in chunks (a memmap is not read into memory at once)."""
    return max(int(tokens[i : i + _MAX_SCAN].max()) for i in range(0, len(tokens), _MAX_SCAN))


def _check_vocab(corpus: Corpus, vocab_size: int) -> str:
    """Raise if ids can reach past ``model.vocab_size``; returns a note when the model is larger."""
    if corpus.vocab_size is not None:
        check_model_vocab(corpus.vocab_size, vocab_size, corpus.source)
    if corpus.indexed:
        top = max_token(corpus.tokens)
        if top >= vocab_size:
            raise DataError(
                f"data.paths: {corpus.source} holds token id {top} >= model.vocab_size ({vocab_size})"
            )
    if corpus.vocab_size is not None and corpus.vocab_size < vocab_size:
        return f" (vocabulary {corpus.vocab_size}, padded to model.vocab_size {vocab_size})"
    return ""


def _split(corpus: Corpus, cfg: DataConfig) -> tuple[_Stream, _Stream]:
    n, need, bounds = len(corpus.tokens), cfg.seq_len + 1, corpus.doc_bounds
    split = corpus.val_start
    num_docs = len(bounds) - 1
    if split is None and num_docs >= 2:  # by document: the last val_fraction of them
        split = int(bounds[num_docs - max(1, round(num_docs * cfg.val_fraction))])
    if split is None or min(split, n - split) < need:  # too few files or documents: by tokens
        split = n - int(n * cfg.val_fraction)
    train = _Stream(corpus.tokens[:split], bounds[bounds < split])
    first_val = max(int(np.searchsorted(bounds, split, side="right")) - 1, 0)
    val = _Stream(corpus.tokens[split:], bounds[first_val:-1] - split)
    for name, part in (("training", train.tokens), ("validation", val.tokens)):
        if len(part) < need:
            raise DataError(
                f"data.paths: corpus {corpus.source} too short: its {name} split has {len(part)} tokens, "
                f"need at least data.seq_len + 1 = {need} (add data or lower data.seq_len)"
            )
    return train, val


class TokenBatches:
    """Train/validation batches of ``[B, S]`` inputs and next-token targets for one rank."""

    def __init__(self, corpora: list[Corpus], cfg: DataConfig, seed: int, vocab_size: int) -> None:
        notes = []
        self.train: list[_Stream] = []
        self.val: list[_Stream] = []
        for corpus in corpora:
            if len(corpus.tokens) == 0:
                raise DataError(f"data.paths: corpus {corpus.source} is empty")
            notes.append(corpus.source + _check_vocab(corpus, vocab_size))
            train, val = _split(corpus, cfg)
            self.train.append(train)
            self.val.append(val)
        weights = np.array([c.weight if c.weight is not None else len(c.tokens) for c in corpora], np.float64)
        self.weights = weights / weights.sum()
        self.cfg, self.seed = cfg, seed
        self.source = " + ".join(
            note if len(corpora) == 1 else f"{w:.3g} x {note}"
            for w, note in zip(self.weights, notes, strict=True)
        )

    @classmethod
    def for_run(cls, cfg: Config) -> TokenBatches:
        """The batches of a run: its data section, seed and vocabulary; ``data.hf`` cached in the
        run directory's ``data_cache/``."""
        corpora = load_corpus(cfg.data, cfg.run_dir / "data_cache")
        return cls(corpora, cfg.data, cfg.run.seed, cfg.model.vocab_size)

    def _batch(self, streams: list[_Stream], key: list[int]) -> Batch:
        S, B = self.cfg.seq_len, self.cfg.micro_batch_size
        rng = np.random.default_rng(key)
        if len(streams) == 1:
            which = np.zeros(B, dtype=np.int64)
            starts = rng.integers(0, len(streams[0].tokens) - S, size=B)
        else:
            which = rng.choice(len(streams), size=B, p=self.weights)
            starts = np.array([rng.integers(0, len(streams[c].tokens) - S) for c in which])
        rows = np.stack(
            [
                np.asarray(streams[c].tokens[s : s + S + 1], dtype=np.int64)
                for c, s in zip(which, starts, strict=True)
            ]
        )
        xy = torch.from_numpy(rows)
        doc_BS = None
        if self.cfg.document_mask:
            positions_BS = starts[:, None] + np.arange(S)[None, :]
            docs = [
                np.searchsorted(streams[c].doc_bounds, positions_BS[b], side="right")
                for b, c in enumerate(which)
            ]
            doc_BS = torch.from_numpy(np.stack([d - d[0] for d in docs]).astype(np.int64))
        return Batch(xy[:, :-1], xy[:, 1:], doc_BS)

    def train_batch(self, step: int, micro: int, rank: int) -> Batch:
        return self._batch(self.train, [self.seed, step, micro, rank])

    def val_batch(self, index: int) -> Batch:
        """Validation batch ``index`` of a fixed set, the same whatever the world size."""
        return self._batch(self.val, [self.seed, _VAL_STREAM, index])
