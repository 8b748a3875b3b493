"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

Shape legend: L MoE layers, N logged steps, E experts, W step bins of a heatmap.

- ``val_loss.png``: validation loss over tokens, every variant on one chart (and a zoom on the
  second half), the baseline's final value as a dashed line (where the iso-loss crossing is read).
- ``gini.png``: per-step Gini of the global counts (mean over layers), smoothed over a window.
- ``gini_layers.png``: LPR's EMA Gini per layer over training, one panel per layer (mean over
  seeds); with several seeds ``val_loss.png`` shows the mean over seeds and a min..max band.
- ``load_<variant>.png``: per layer, a heatmap steps x experts of the normalised load
  (count / mean count: 1 = balanced, 0 = dead expert), steps averaged into at most 200 bins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402

from moe_dist.compare.arm_logs import RunLog  # noqa: E402
from moe_dist.compare.report import ema_gini_curve, per_step_gini  # noqa: E402

HEATMAP_MAX = 3.0  # colour scale of normalised load: 0 .. 3x the mean, the same for every variant


def plot_val_loss(logs: dict[str, RunLog], baseline: str, path: Path) -> Path:
    """Two panels: the whole curves, and the second half of training where the variants part."""
    fig, (ax_all, ax_end) = plt.subplots(1, 2, figsize=(11, 4.5))
    base = logs.get(baseline)
    for ax in (ax_all, ax_end):
        for name, log in logs.items():
            if len(log.val_loss_M):
                lw = 2.0 if name == baseline else 1.2
                ax.plot(log.eval_tokens_M / 1e6, log.val_loss_M, marker=".", ms=3, label=name, lw=lw)
        if base is not None and base.final_val_loss is not None:
            ax.axhline(base.final_val_loss, color="k", ls="--", lw=0.8, label=f"{baseline} final")
        ax.set_xlabel("tokens (M)")
        ax.grid(alpha=0.3)
    ax_all.set_ylabel("validation loss (nats/token)")
    ax_all.set_title("Validation loss")
    curves = [(log.eval_tokens_M / 1e6, log.val_loss_M) for log in logs.values() if len(log.val_loss_M)]
    return _zoom_and_save(fig, ax_end, curves, path, pad=0.05, legend_size=8)


def _zoom_and_save(
    fig: plt.Figure, ax_end: plt.Axes, curves: list[tuple[np.ndarray, np.ndarray]], path: Path, **kw: float
) -> Path:
    """Zoom ``ax_end`` on the second half of the (tokens in M, loss) ``curves``, then save the figure."""
    if curves:
        x_max = max(float(x[-1]) for x, _ in curves)
        late = [v[x >= x_max / 2] for x, v in curves if (x >= x_max / 2).any()]
        lo, hi = min(float(v.min()) for v in late), max(float(v.max()) for v in late)
        pad = kw.get("pad", 0.05) * max(hi - lo, 1e-3)
        ax_end.set_xlim(x_max / 2, x_max * 1.02)
        ax_end.set_ylim(lo - pad, hi + pad)
    ax_end.set_title("Second half (zoom)")
    ax_end.legend(fontsize=kw.get("legend_size", 8))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(y_N: np.ndarray, window: int) -> np.ndarray:
    if len(y_N) < window or window <= 1:
        return y_N
    kernel = np.ones(window) / window
    return np.convolve(y_N, kernel, mode="valid")


def plot_gini(logs: dict[str, RunLog], path: Path, window: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, log in logs.items():
        g_N = _smooth(per_step_gini(log.counts_LNE), window)
        ax.plot(log.steps_N[len(log.steps_N) - len(g_N) :], g_N, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"Gini of per-step load (mean over layers, {window}-step mean)")
    ax.set_title("Load imbalance over training (0 = balanced)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def binned_load(counts_NE: np.ndarray, max_bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges as step indices [W+1], normalised load [E, W]) with steps averaged per bin."""
    N = counts_NE.shape[0]
    edges = np.linspace(0, N, min(N, max_bins) + 1).astype(int)
    load_WE = np.stack([counts_NE[a:b].sum(axis=0) for a, b in zip(edges[:-1], edges[1:])])
    mean_W1 = load_WE.mean(axis=1, keepdims=True)
    norm_WE = np.divide(load_WE, mean_W1, out=np.ones_like(load_WE), where=mean_W1 > 0)
    return edges, norm_WE.T


def plot_load_heatmap(log: RunLog, path: Path) -> Path:
    L = log.counts_LNE.shape[0]
    fig, axes = plt.subplots(L, 1, figsize=(8, 1.6 + 1.3 * L), sharex=True, squeeze=False)
    steps = log.steps_N
    image = None
    for li in range(L):
        ax = axes[li, 0]
        edges, norm_EW = binned_load(log.counts_LNE[li])
        x_edges = np.append(steps[edges[:-1]], steps[-1] + 1)
        image = ax.pcolormesh(
            x_edges,
            np.arange(norm_EW.shape[0] + 1) - 0.5,
            norm_EW,
            vmin=0.0,
            vmax=HEATMAP_MAX,
            cmap="viridis",
            shading="flat",
        )
        ax.set_ylabel(f"layer {log.layer_ids[li]}\nexpert", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{log.name}: expert load / mean load per step (1 = balanced)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.02)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_val_loss_seeds(logs_by_seed: dict[Any, dict[str, RunLog]], baseline: str, path: Path) -> Path:
    """Mean validation loss over seeds per arm, with the band between the seeds' min and max
    (evaluations at the same steps in every seed), and the second half zoomed."""
    fig, (ax_all, ax_end) = plt.subplots(1, 2, figsize=(11, 4.5))
    arms = list(dict.fromkeys(a for logs in logs_by_seed.values() for a in logs))
    curves: list[tuple[np.ndarray, np.ndarray]] = []  # (tokens in M, mean loss) per arm, for the zoom
    for arm in arms:
        runs = [logs[arm] for logs in logs_by_seed.values() if arm in logs and len(logs[arm].val_loss_M)]
        if not runs:
            continue
        m = min(len(r.val_loss_M) for r in runs)
        x = runs[0].eval_tokens_M[:m] / 1e6
        v_SM = np.stack([r.val_loss_M[:m] for r in runs])
        curves.append((x, v_SM.mean(axis=0)))
        for ax in (ax_all, ax_end):
            (line,) = ax.plot(
                x, v_SM.mean(axis=0), lw=2.0 if arm == baseline else 1.2, label=f"{arm} (n={len(runs)})"
            )
            ax.fill_between(x, v_SM.min(axis=0), v_SM.max(axis=0), color=line.get_color(), alpha=0.2)
            if arm == baseline:
                ax.axhline(v_SM[:, -1].mean(), color="k", ls="--", lw=0.8, label=f"{baseline} final (mean)")
    for ax in (ax_all, ax_end):
        ax.set_xlabel("tokens (M)")
        ax.grid(alpha=0.3)
    ax_all.set_ylabel("validation loss (nats/token)")
    ax_all.set_title("Validation loss: mean over seeds, band = min..max")
    return _zoom_and_save(fig, ax_end, curves, path, pad=0.1, legend_size=7)


def plot_gini_layers(logs_by_seed: dict[Any, dict[str, RunLog]], path: Path) -> Path:
    """LPR's EMA Gini (0.99 EMA of per-step counts) per layer over training, mean over seeds:
    one panel per MoE layer, one line per arm."""
    arms = list(dict.fromkeys(a for logs in logs_by_seed.values() for a in logs))
    first = next(log for logs in logs_by_seed.values() for log in logs.values())
    L = first.counts_LNE.shape[0]
    cols = min(L, 3)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for li in range(L):
        ax = axes[li // cols, li % cols]
        for arm in arms:
            runs = [logs[arm] for logs in logs_by_seed.values() if arm in logs]
            n = min(len(r.steps_N) for r in runs)
            g_SN = np.stack([ema_gini_curve(r.counts_LNE[li, :n]) for r in runs])
            ax.plot(runs[0].steps_N[:n], g_SN.mean(axis=0), label=arm, lw=1.2)
        ax.set_title(f"layer {first.layer_ids[li]}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for li in range(L, rows * cols):
        axes[li // cols, li % cols].axis("off")
    axes[0, 0].set_ylabel("EMA Gini (LPR's way)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Per-layer load imbalance over training (0 = balanced), mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(logs_by_seed: dict[Any, dict[str, RunLog]], baseline: str, out_dir: Path) -> list[Path]:
    """Single seed: val_loss, gini and a heatmap per arm; several: seed bands and per-layer Gini
    too (heatmaps of the first seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(logs_by_seed.values()))
    if len(logs_by_seed) == 1:
        paths = [plot_val_loss(first, baseline, out_dir / "val_loss.png")]
    else:
        paths = [plot_val_loss_seeds(logs_by_seed, baseline, out_dir / "val_loss.png")]
    paths += [
        plot_gini(first, out_dir / "gini.png"),
        plot_gini_layers(logs_by_seed, out_dir / "gini_layers.png"),
    ]
    paths += [plot_load_heatmap(log, out_dir / f"load_{name}.png") for name, log in first.items()]
    return paths
