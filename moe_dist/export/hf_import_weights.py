"""A Hugging Face checkpoint's tensors into our model, through ``hf_weights``'s table.

``HFTensorFiles(hf_dir)``: ``model.safetensors``, or the shards that
``model.safetensors.index.json`` names (``save_pretrained(max_shard_size=...)``, the Hub's large
models). Every shard must be there and hold the tensors the index gives it; each file is read
through ``safetensors.safe_open`` (headers first, a tensor only when it is copied).

``fill_model(model, links, files)``: every link's tensor is checked before anything is copied:
present, its shape equal to ``link.view`` of our parameter, a float dtype. Any tensor of the
files that no link names is refused too (biases, a layout we do not read), except the RoPE
``inv_freq`` buffers older checkpoints saved and an ``lm_head.weight`` beside tied embeddings
(``transformers`` ties it to the embedding on load). Then each tensor is upcast to fp32 (our
master weights; bf16 and fp16 are exact in fp32) and copied into its view. Problems are
``HFImportError``, all kinds in one line with the first few names of each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moe_dist.export.hf_import_config import HFImportError
from moe_dist.export.hf_weights import TensorLink

FLOAT_DTYPES = ("F32", "F16", "BF16")
INDEX = "model.safetensors.index.json"


def _first(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class HFTensorFiles:
    """Tensor names, shapes and values of the safetensors files of ``hf_dir``."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        index = hf_dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise HFImportError(f"{index}: no readable weight_map ({exc.__class__.__name__})") from None
        elif (hf_dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise HFImportError(
                f"{hf_dir}: no model.safetensors or {INDEX} (import-hf reads safetensors only; "
                "convert pytorch_model.bin files first)"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            assert weight_map is not None
            count = sum(1 for f in weight_map.values() if f in missing)
            raise HFImportError(
                f"{hf_dir}: missing shard(s) {_first(missing)} ({count} tensors; {INDEX} names them)"
            )
        self.handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        for f in files:
            try:
                handle = safe_open(str(hf_dir / f), framework="pt")
            except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
                raise HFImportError(f"{hf_dir / f}: not a readable safetensors file ({exc})") from None
            self.handles[f] = handle
            self.where |= dict.fromkeys(handle.keys(), f)
        if weight_map:
            absent = [n for n, f in weight_map.items() if self.where.get(n) != f]
            if absent:
                raise HFImportError(f"{hf_dir}: {INDEX} names tensors its shards lack: {_first(absent)}")

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self.handles[self.where[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)


def ignorable(name: str, tied: bool) -> bool:
    """Tensors a checkpoint may hold that carry no weight of ours (module docstring)."""
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def check_tensors(
    state: dict[str, torch.Tensor],
    links: list[TensorLink],
    files: HFTensorFiles,
    expected: Iterable[str],
    tied: bool,
) -> None:
    """``HFImportError`` for missing, unexpected, mis-shaped or non-float tensors (module docstring).
    ``expected``: every name the source architecture holds (``links`` may leave some unread)."""
    have = files.names()
    expected = set(expected)
    missing = [link.hf for link in links if link.hf not in have]
    unexpected = sorted(n for n in have - expected if not ignorable(n, tied))
    shapes, dtypes = [], []
    for link in links:
        if link.hf not in have:
            continue
        want, got = tuple(link.view(state[link.ours]).shape), files.shape(link.hf)
        if want != got:
            where = files.where[link.hf]
            shapes.append(f"{link.hf} is {list(got)} in {where}, config.json gives {list(want)}")
        if files.dtype(link.hf) not in FLOAT_DTYPES:
            dtypes.append(f"{link.hf} ({files.dtype(link.hf)})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing: {_first(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_first(shapes, 2)}")
    if dtypes:
        problems.append(f"not float16/bfloat16/float32: {_first(dtypes)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors this architecture does not have: {_first(unexpected)}")
    if problems:
        raise HFImportError("; ".join(problems))


@torch.no_grad()
def fill_model(state: dict[str, torch.Tensor], links: list[TensorLink], files: HFTensorFiles) -> int:
    """Copy every link's tensor (fp32) into its view of ``state`` (a model's state dict, whose
    tensors share the parameters' storage); returns the number of elements copied."""
    copied = 0
    for link in links:
        view = link.view(state[link.ours])
        view.copy_(files.get(link.hf).to(torch.float32))
        copied += view.numel()
    return copied
