"""Draw the documentation's figures: the data-flow picture and the measured scale-out plot.

Run from the repository root: `python docs/make_figures.py`. It writes `docs/img/data-flow.png` and
`docs/img/scale-out-h200.png`. The plot reads its figures from the committed benchmark results
(`benchmarks/results/scale_out_nvidia_h200_*.json`), never from numbers typed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
RESULTS = ROOT / "benchmarks" / "results"

# The runs of docs/performance.md's main scale-out table: (label, jobs-of-8 result, jobs-of-1 result or None).
SCALE_OUT_RUNS: list[tuple[str, str, str | None]] = [
    ("2026-12-02", "scale_out_nvidia_h200_20261202T231625.json", None),
    ("12-03 run 1", "scale_out_nvidia_h200_20261203T073940.json", "scale_out_nvidia_h200_20261203T074120.json"),
    ("12-03 run 2", "scale_out_nvidia_h200_20261203T075248.json", "scale_out_nvidia_h200_20261203T075429.json"),
    ("12-03 run 3", "scale_out_nvidia_h200_20261203T081014.json", "scale_out_nvidia_h200_20261203T081156.json"),
]


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, title: str, body: str, colour: str) -> None:
    """One rounded box at (x, y) (lower left, axes units 0..100) with a bold title and smaller body lines."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4,rounding_size=1.2",
                                facecolor=colour, edgecolor="#444444", linewidth=1.0))
    ax.text(x + w / 2, y + h - 2.2, title, ha="center", va="top", fontsize=9.5, fontweight="bold")
    ax.text(x + w / 2, y + h - 6.4, body, ha="center", va="top", fontsize=7.6, linespacing=1.35)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], label: str = "",
           offset: tuple[float, float] = (0.0, 1.6)) -> None:
    """An arrow from start to end (axes units) with an optional label beside its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=13, linewidth=1.2, color="#333333"))
    if label:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, label, ha="center", va="bottom", fontsize=7.2, color="#222222")


def data_flow(path: Path) -> None:
    """The data-flow picture: files -> producer -> Redis -> worker stages -> Redis -> mask files."""
    fig, ax = plt.subplots(figsize=(11, 6.8))
    ax.set_xlim(0, 100)
    ax.set_ylim(-1, 68)
    ax.axis("off")
    producer, redis, worker, out = "#dcebf7", "#fbe3d6", "#e2f0d9", "#eeeeee"

    ax.text(50, 67.5, "segqueue data flow: one queue; any number of producers and workers share one Redis",
            ha="center", va="top", fontsize=10.5)
    _box(ax, 1, 45, 15, 17, "image files", "PNG, JPEG, TIFF,\nBMP; folders\nsearched\nrecursively", out)
    _box(ax, 21, 41, 22, 21, "producer enqueue",
         "--workers processes:\ndecode, validate, resize\nto --size (a PNG already\nat the engine's input is\n"
         "stored as it is); 16 files\nper round trip", producer)
    _box(ax, 49, 37, 26, 25, "Redis (AOF on)",
         "segq:Q:img:<id>: image hash\n(PNG or zstd-1 pixels)\n\nrq jobs of --job-size image ids\n"
         "(JSON, never pickle)\n\nsegq:Q:mask:<id>: mask hash\n(bit-packed + zstd-1)", redis)
    _box(ax, 81, 45, 18, 17, "mask files", "PNG at original size,\nsame relative\nnames, 0 / 255", out)

    ax.add_patch(FancyBboxPatch((0.2, -0.6), 99.4, 32.4, boxstyle="round,pad=0,rounding_size=1.5",
                                facecolor="none", edgecolor="#2f5f1f", linestyle="--", linewidth=1.0))
    ax.text(1.5, 0.2, "worker run: one process per GPU or CPU, on any host", ha="left", va="bottom",
            fontsize=8.5, style="italic", color="#2f5f1f")
    _box(ax, 1, 5, 20, 24, "claim",
         "jobs LMOVE'd into\nrq's started registry;\nlease thread heartbeats\nthem every 2 s\n"
         "worker/rq_source.py", worker)
    _box(ax, 25, 5, 17, 24, "batcher",
         "across jobs:\n<= --max-batch (8)\n<= --max-wait-ms (20)\nno Redis, no CUDA\nworker/batcher.py", worker)
    _box(ax, 46, 5, 17, 24, "fetch + decode",
         "8 fetch threads,\n8 decode processes;\none round trip\nper batch\nworker/loader.py", worker)
    _box(ax, 67, 5, 14, 24, "engine",
         "2 batches in\nflight (slots);\n.ptc replays a\nCUDA graph\nengines/", worker)
    _box(ax, 85, 5, 14, 24, "writer",
         "masks back in one\nround trip; jobs\nfinished or failed;\none JSON log\nline per batch", worker)

    _arrow(ax, (16.6, 53.5), (20.4, 53.5))
    _arrow(ax, (43.6, 51.5), (48.4, 51.5), "images\n+ jobs", (0.0, -6.5))
    _arrow(ax, (75.6, 53.5), (80.4, 53.5), "collect\nor --out", (0.0, -6.5))
    _arrow(ax, (52, 36.4), (11, 29.6), "job ids", (-6.0, 0.8))
    _arrow(ax, (21.6, 17), (24.4, 17))
    _arrow(ax, (42.6, 17), (45.4, 17))
    _arrow(ax, (63.6, 17), (66.4, 17))
    _arrow(ax, (81.6, 17), (84.4, 17))
    _arrow(ax, (58, 36.4), (55, 29.6), "pixels", (-3.8, 0.0))
    _arrow(ax, (92, 29.6), (72, 36.4), "masks, job results", (9.0, 0.0))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _load(name: str) -> dict:
    """One committed scale_out result (benchmarks/scale_out.py's JSON)."""
    return json.loads((RESULTS / name).read_text())


def scale_out_plot(path: Path) -> None:
    """Engine alone vs files to masks (jobs of 8 and of 1) on one H200, img/s, with the ratio over each bar."""
    labels, engine, jobs8, jobs1, ratio8, ratio1 = [], [], [], [], [], []
    for label, eight, one in SCALE_OUT_RUNS:
        run8 = _load(eight)
        labels.append(label)
        engine.append(run8["engine_img_s"])
        jobs8.append(run8["e2e_img_s"])
        ratio8.append(run8["e2e_vs_engine"])
        run1 = _load(one) if one else None
        jobs1.append(run1["e2e_img_s"] if run1 else 0.0)
        ratio1.append(run1["e2e_vs_engine"] if run1 else None)

    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.26
    xs = range(len(labels))
    ax.bar([x - width for x in xs], engine, width, label="engine alone (engines bench, batch 8)", color="#7f7f7f")
    bars8 = ax.bar(list(xs), jobs8, width, label="files to masks, jobs of 8 (16,000 images)", color="#2e75b6")
    bars1 = ax.bar([x + width for x in xs], jobs1, width, label="files to masks, jobs of 1 (8,000 images)",
                   color="#c55a11")
    for bar, value in zip(bars8, ratio8, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 12, f"{value:.3f}", ha="center", fontsize=8)
    for bar, value in zip(bars1, ratio1, strict=True):
        text = "not run" if value is None else f"{value:.3f}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 12, text, ha="center", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("images per second")
    ax.set_ylim(0, 1400)
    ax.set_title("One NVIDIA H200, compiled FP16 U-Net (width 64, 512x512), Redis AOF on\n"
                 "number over a bar: files to masks / engine alone (bar 0.90 for jobs of 8)", fontsize=9.5)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    """Write both figures under docs/img/."""
    IMG.mkdir(exist_ok=True)
    data_flow(IMG / "data-flow.png")
    scale_out_plot(IMG / "scale-out-h200.png")


if __name__ == "__main__":
    main()
