"""``run.profile``: a ``torch.profiler`` Chrome trace per rank of a few training steps.

Steps ``start_step`` .. ``start_step + steps - 1`` are recorded (CPU activity, and CUDA kernels on
CUDA) and written to ``DIR/trace_rank<R>.json`` (default DIR: ``RUN_DIR/profile``), readable in
``chrome://tracing`` or https://ui.perfetto.dev. The layers and the engine mark their phases with
``moe_dist.profile_ranges.named_range``: ``router`` (gate: router + balancing losses),
``dispatch`` (slot sort and the exchange to the experts' ranks), ``all_to_all`` (the row
exchanges inside dispatch and combine), ``experts``, ``combine``, ``optimizer``; the ranges cost
nothing while no profiler records. Backward kernels appear under autograd's own names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_dist.config.schema import ProfileConfig


class StepProfiler:
    """Starts a profiler before ``start_step`` and writes the trace after the last profiled step."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self.dir = Path(cfg.dir) if cfg.dir else run_dir / "profile"
        self.last = cfg.start_step + cfg.steps - 1
        self.prof: torch.profiler.profile | None = None
        self.trace: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.steps > 0

    def before(self, step: int) -> None:
        """Call at the start of each step."""
        if self.enabled and step == self.cfg.start_step and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()

    def after(self, step: int) -> None:
        """Call at the end of each step: the last profiled step writes the trace."""
        if self.prof is not None and step >= self.last:
            self.close()

    def close(self) -> Path | None:
        """Stop and write the trace (also when the run ends inside the window); the trace's path."""
        if self.prof is None:
            return self.trace
        prof, self.prof = self.prof, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trace = self.dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(self.trace))
        return self.trace
