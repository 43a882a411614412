"""Assemble `report/`: report.md with the tables, and the PNG plots beside it."""

from __future__ import annotations

from pathlib import Path

from report import plots as report_plots
from report.analysis import DiceResult, LogData, latency_percentiles, throughput
from report.plots import WAITING


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"  # NaN check without math import


def write_report(out_dir: Path, logs: LogData, dice: DiceResult | None = None) -> Path:
    """Write report.md and plots into `out_dir`; returns the report.md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Segmentation run report", ""]
    lines += _logs_section(logs)
    if logs.batches:
        lines += _throughput_section(out_dir, logs)
    if dice is not None:
        lines += _dice_section(out_dir, dice)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _logs_section(logs: LogData) -> list[str]:
    lines = ["## Logs", "", "| file | lines | malformed (skipped) |", "|---|---|---|"]
    for source, count in logs.lines.items():
        lines.append(f"| `{source}` | {count} | {logs.malformed[source]} |")
    lines += ["", f"{len(logs.batches)} batch events read; {logs.malformed_total} malformed lines skipped.", ""]
    return lines


def _throughput_section(out_dir: Path, logs: LogData) -> list[str]:
    batches = logs.batches
    total = throughput(batches)
    percentiles = latency_percentiles(batches)
    report_plots.throughput_over_time(batches, out_dir / "throughput.png")
    report_plots.latency_split(batches, out_dir / "latency_split.png")
    report_plots.batch_size_histogram(batches, out_dir / "batch_sizes.png")
    report_plots.latency_percentile_plot(batches, out_dir / "latency_percentiles.png")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    lines = [
        "## Throughput and latency",
        "",
        "Total FPS is all images over the union of the workers' busy intervals (first batch start to "
        "last batch end of each worker), not a sum of per-worker rates.",
        "",
        "| workers | batches | images | wall (s) | FPS | mean batch size |",
        "|---|---|---|---|---|---|",
        f"| {total.workers} | {total.batches} | {total.images} | {_fmt(total.wall_s, 3)} | {_fmt(total.img_per_s)} "
        f"| {_fmt(mean([b.batch_size for b in batches]))} |",
        "",
        "| per worker | batches | images | FPS (own busy time) |",
        "|---|---|---|---|",
    ]
    for worker in sorted({b.worker for b in batches}):
        own = throughput([b for b in batches if b.worker == worker])
        lines.append(f"| {worker} | {own.batches} | {own.images} | {_fmt(own.img_per_s)} |")
    lines += [
        "",
        "| latency per image (enqueue to mask) | p50 | p95 | p99 |",
        "|---|---|---|---|",
        f"| ms | {_fmt(percentiles[50], 1)} | {_fmt(percentiles[95], 1)} | {_fmt(percentiles[99], 1)} |",
        "",
        f"| per batch, mean ms | fetch | compute | write | {WAITING} | total |",
        "|---|---|---|---|---|---|",
        f"| | {_fmt(mean([b.fetch_ms for b in batches]))} | {_fmt(mean([b.compute_ms for b in batches]))} "
        f"| {_fmt(mean([b.write_ms for b in batches]))} | {_fmt(mean([b.waiting_ms for b in batches]))} "
        f"| {_fmt(mean([b.total_ms for b in batches]))} |",
        "",
        "A batch's total runs from the moment the batcher hands it out to the moment its masks are written: "
        "fetch (reading and decoding its images from Redis), compute (from handing the batch to the engine until "
        f"its masks are back), write (masks to Redis and job completion), and {WAITING} "
        "(total minus those three: waiting for a fetch thread, for a free engine slot and in the writer's queue; "
        "the latency split plot stacks the same four parts). An image's wait in the queue before its batch is "
        "not part of total; the per-image latency above includes it.",
        "",
        "![throughput](throughput.png)",
        "![latency split](latency_split.png)",
        "![batch sizes](batch_sizes.png)",
        "![latency percentiles](latency_percentiles.png)",
        "",
    ]
    return lines


def _dice_section(out_dir: Path, dice: DiceResult) -> list[str]:
    lines = ["## Dice", ""]
    if not dice.per_file:
        return lines + ["No mask matched a ground-truth file by name.", ""]
    report_plots.dice_histogram(dice.per_file, out_dir / "dice.png")
    lines += [
        "| images scored | mean Dice | median Dice | Deviation (vs reference) | agreement with reference (Dice) |",
        "|---|---|---|---|---|",
    ]
    agreement = (sum(dice.agreement_per_file.values()) / len(dice.agreement_per_file)
                 if dice.agreement_per_file else float("nan"))
    lines += [
        f"| {len(dice.per_file)} | {_fmt(dice.mean, 4)} | {_fmt(dice.median, 4)} | {_fmt(dice.deviation, 4)} "
        f"| {_fmt(agreement, 4)} |",
        "",
        "Deviation is this run's mean Dice minus the reference run's, both against the truth (the study's "
        "column); agreement is the Dice between this run's masks and the reference run's.",
        "",
        "| 5 worst files | Dice |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {score:.4f} |" for name, score in dice.worst(5)]
    if dice.missing:
        lines += ["", f"{len(dice.missing)} ground-truth files had no usable mask: "
                      + ", ".join(f"`{m}`" for m in dice.missing[:10]) + (" ..." if len(dice.missing) > 10 else "")]
    lines += ["", "![dice](dice.png)", ""]
    return lines
