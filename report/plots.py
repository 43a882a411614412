"""The report's PNG plots (matplotlib, no display needed). Each function writes one file and returns its path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from report.analysis import BatchRecord, latency_percentiles, throughput_series  # noqa: E402

# The part of a batch's total_ms outside fetch, compute and write (BatchRecord.waiting_ms), as the
# latency split plot's legend and report.md's latency table name it.
WAITING = "waiting between stages"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_over_time(batches: list[BatchRecord], path: Path, bin_s: float | None = None) -> Path:
    """Images per second (all workers together) over time, binned by `analysis.throughput_series`."""
    series = throughput_series(batches, bin_s)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    starts = np.append(series.starts_s, series.starts_s[-1] + series.bin_s)
    ax.stairs(series.img_per_s, starts)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since first batch")
    ax.set_ylabel("images / s")
    ax.set_title(f"Throughput over time ({series.bin_s:.2g} s bins)")
    return _save(fig, path)


def latency_split(batches: list[BatchRecord], path: Path) -> Path:
    """Per-batch latency (ms), stacked: fetch, compute (submit to masks), write, and WAITING (the rest of total_ms)."""
    index = np.arange(len(batches))
    fetch = np.array([b.fetch_ms for b in batches])
    compute = np.array([b.compute_ms for b in batches])
    write = np.array([b.write_ms for b in batches])
    waiting = np.array([b.waiting_ms for b in batches])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bottom = np.zeros(len(batches))
    for values, label in ((fetch, "fetch"), (compute, "compute"), (write, "write"), (waiting, WAITING)):
        ax.bar(index, values, bottom=bottom, label=label, width=0.9)
        bottom += values
    ax.set_xlabel("batch (in completion order)")
    ax.set_ylabel("ms")
    ax.set_title(f"Per-batch latency split ({WAITING} = total - fetch - compute - write)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def batch_size_histogram(batches: list[BatchRecord], path: Path) -> Path:
    """How many batches had each size."""
    sizes = [b.batch_size for b in batches]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(sizes, bins=[size + 0.5 for size in range(max(sizes) + 1)], rwidth=0.8)  # one bin per size
    ax.set_xlabel("batch size (images)")
    ax.set_ylabel("batches")
    ax.set_title("Batch sizes")
    return _save(fig, path)


def latency_percentile_plot(batches: list[BatchRecord], path: Path) -> Path:
    """Enqueue-to-mask latency percentiles (p50 to p99) over every image."""
    percents = (50, 75, 90, 95, 99)
    values = latency_percentiles(batches, percents)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([f"p{p}" for p in percents], [values[p] for p in percents])
    ax.set_ylabel("ms")
    ax.set_title("End-to-end latency per image")
    return _save(fig, path)


DICE_MIN_SPAN = 0.02  # the Dice axis is never narrower than this, so equal scores still show as one bar


def dice_axis_range(scores: list[float], min_span: float = DICE_MIN_SPAN) -> tuple[float, float]:
    """The Dice histogram's x range: the scores' range with 5% margins, at least `min_span` wide, inside [0, 1]."""
    low, high = min(scores), max(scores)
    margin = 0.05 * (high - low)
    low, high = max(0.0, low - margin), min(1.0, high + margin)
    if high - low < min_span:  # widen about the middle, kept inside [0, 1]
        middle = min(max((low + high) / 2, min_span / 2), 1.0 - min_span / 2)
        low, high = middle - min_span / 2, middle + min_span / 2
    return low, high


def dice_histogram(per_file: dict[str, float], path: Path) -> Path:
    """Distribution of per-image Dice against the ground truth, on an axis fitted to the scores (dice_axis_range)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    scores = list(per_file.values())
    ax.hist(scores, bins=20, range=dice_axis_range(scores))
    ax.set_xlabel("Dice")
    ax.set_ylabel("images")
    ax.set_title("Per-image Dice")
    return _save(fig, path)
