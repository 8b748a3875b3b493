"""How many bytes a forward keeps for its backward (what activation memory a layer costs).

Counted through ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd (or a custom
function's ``save_for_backward``) keeps, once per storage, leaving out the given tensors (a
module's parameters and its input, which exist without it). Device independent, so the
property ``tools/bench_layer_cuda.py`` reports on a GPU is tested on CPU
(``tests/ops/test_activation_memory.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")


def saved_for_backward(forward: Callable[[], T], exclude: Iterable[torch.Tensor]) -> tuple[int, T]:
    """``(bytes, forward())``: the bytes of the distinct storages ``forward`` saves for backward,
    the storages of ``exclude`` left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(storages.values()), out
