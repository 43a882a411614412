"""The report's PNG plots (matplotlib, no display needed). Each function writes one file and returns its path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from report.analysis import BatchRecord, latency_percentiles, throughput_series  # noqa: E402


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
    """Per-batch latency, stacked: fetch, compute (submit to masks), write, and the rest of total_ms."""
    index = np.arange(len(batches))
    fetch = np.array([b.fetch_ms for b in batches])
    compute = np.array([b.compute_ms for b in batches])
    write = np.array([b.write_ms for b in batches])
    other = np.maximum(0, np.array([b.total_ms for b in batches]) - fetch - compute - write)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bottom = np.zeros(len(batches))
    for values, label in ((fetch, "fetch"), (compute, "compute"), (write, "write"), (other, "other")):
        ax.bar(index, values, bottom=bottom, label=label, width=0.9)
        bottom += values
    ax.set_xlabel("batch (in completion order)")
    ax.set_ylabel("ms")
    ax.set_title("Per-batch latency split")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def batch_size_histogram(batches: list[BatchRecord], path: Path) -> Path:
    """How many batches had each size."""
    sizes = [b.batch_size for b in batches]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(sizes, bins=np.arange(0.5, max(sizes) + 1.5, 1.0), rwidth=0.8)
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


def dice_histogram(per_file: dict[str, float], path: Path) -> Path:
    """Distribution of per-image Dice against the ground truth."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(list(per_file.values()), bins=20, range=(min(0.5, min(per_file.values())), 1.0))
    ax.set_xlabel("Dice")
    ax.set_ylabel("images")
    ax.set_title("Per-image Dice")
    return _save(fig, path)
