"""``run.sync_debug``: CUDA's sync debug mode around the steps that must not wait for the device.

A step that neither logs, evaluates nor saves launches its work and goes on (``run.py``);
``torch.cuda.set_sync_debug_mode`` makes every host synchronisation inside it warn or raise,
with the Python stack of the call that synchronised. The first two steps of a run are left out
(compilation and the allocator's first growth may synchronise). On CPU it does nothing: the
CPU test suite counts host reads instead (``tests/training/test_host_syncs.py``).
"""

from __future__ import annotations

import torch


class SyncDebug:
    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode if device.type == "cuda" else "off"

    def enter(self, step: int, start_step: int, reads_back: bool) -> bool:
        """Turn the check on for ``step`` when it is a steady step; whether it did."""
        steady = self.mode != "off" and step > start_step + 2 and not reads_back
        if steady:
            torch.cuda.set_sync_debug_mode(self.mode)
        return steady

    def leave(self, steady: bool) -> None:
        """Off again before the step's own logging, evaluation or checkpoint."""
        if steady:
            torch.cuda.set_sync_debug_mode(0)
