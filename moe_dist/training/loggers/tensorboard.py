"""TensorBoard logger: ``torch.utils.tensorboard.SummaryWriter`` event files (rank 0).

Imported only when ``logging.tensorboard.enabled`` (or by ``moe-dist export-tb``). Per step: one
event holding one ``Summary`` with every tag of ``records.record_scalars`` (``simple_value``, as
``add_scalar`` writes them, built in one go: ~10x cheaper than one ``add_scalar`` per tag) and
one histogram per MoE layer with one bucket per expert id (bucket ``e`` = expert ``e``'s
token-slots, as ``add_histogram_raw`` writes it), so TensorBoard's histogram and distribution
panels show the load shape over the run. The writer queues events and a background thread
writes them (flushed every ``flush_secs``).
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from torch.utils.tensorboard import SummaryWriter


class TensorBoardLogger:
    """Writes one TensorBoard run (event files in ``log_dir``)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, resume_step: int | None = None, flush_secs: int = 10) -> None:
        # purge_step: on resume, TensorBoard hides the earlier attempt's events after the checkpoint
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=flush_secs)
        self.log_dir = Path(log_dir)

    def log(
        self,
        step: int,
        scalars: dict[str, float],
        histograms: dict[str, list[float]],
        walltime: float | None = None,
    ) -> None:
        """One step as one event (all tags in one ``Summary``); ``walltime`` defaults to now."""
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        for tag, counts in histograms.items():
            histo = expert_histogram(counts)
            if histo is not None:
                values.append(Summary.Value(tag=tag, histo=histo))
        self.writer._get_file_writer().add_summary(Summary(value=values), step, walltime)

    def close(self) -> None:
        self.writer.close()


def expert_histogram(counts: list[float]) -> HistogramProto | None:
    """Token-slots per expert as a histogram over expert ids (one bucket per expert); None if empty."""
    total = float(sum(counts))
    if total <= 0:
        return None
    used = [e for e, c in enumerate(counts) if c > 0]
    return HistogramProto(
        min=float(used[0]),
        max=float(used[-1]),
        num=total,
        sum=float(sum(e * c for e, c in enumerate(counts))),
        sum_squares=float(sum(e * e * c for e, c in enumerate(counts))),
        bucket_limit=[e + 0.5 for e in range(len(counts))],
        bucket=[float(c) for c in counts],
    )
