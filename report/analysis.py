"""Offline analysis of worker logs and collected masks: throughput, latency, batch sizes and Dice.

Input: the JSON lines that `worker run --log-file` writes (one `batch` event per batch) from any
number of workers, and optionally mask folders (`producer collect` output, ground truth, a reference
run). Lines that are not JSON, or `batch` events missing a field, are counted and skipped; a file
with no batch line at all that is not a JSON log (the worker's console output) is refused by name.

Merging workers: total throughput is all images over the union of the workers' busy intervals
(each worker's first batch start to its last batch end), not a sum of per-worker rates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from common.metrics import dice

BATCH_FIELDS = ("worker", "batch_size", "images_ok", "fetch_ms", "compute_ms", "write_ms", "total_ms", "time")


@dataclass(frozen=True)
class BatchRecord:
    """One `batch` log event. end_s: completion time (unix s); start_s = end_s - total_ms / 1000."""

    source: str
    worker: str
    engine: str
    batch_size: int
    images_ok: int
    fetch_ms: float
    compute_ms: float
    write_ms: float
    total_ms: float
    end_s: float
    image_wait_ms: tuple[float, ...]
    tile_of: tuple[str | None, ...] = ()  # per image_wait_ms entry: the tiled image it is a tile of, or None

    @property
    def start_s(self) -> float:
        return self.end_s - self.total_ms / 1000.0

    @property
    def waiting_ms(self) -> float:
        """The part of total_ms outside fetch, compute and write (ms, never negative): the batch waiting
        between those stages (for a fetch thread, for a free engine slot, in the writer's queue)."""
        return max(0.0, self.total_ms - self.fetch_ms - self.compute_ms - self.write_ms)

    def image_latencies_ms(self) -> list[float]:
        """Enqueue-to-mask latency of each image of the batch (wait before the batch + the batch's total)."""
        return [wait + self.total_ms for wait in self.image_wait_ms]


@dataclass
class LogData:
    """Every batch read from the logs, and how many lines were skipped per file (malformed or truncated)."""

    batches: list[BatchRecord] = field(default_factory=list)
    malformed: dict[str, int] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


class NoBatchLines(ValueError):
    """A log file holds no `batch` JSON line: most likely the worker's console output, not its --log-file."""

    def __init__(self, source: str, lines: int) -> None:
        super().__init__(f"{source}: no batch lines ({lines} lines are not JSON batch records); pass the worker's "
                         "--log-file JSON log, not its console output")
        self.source = source


def parse_batch(source: str, event: dict) -> BatchRecord:
    """A BatchRecord from a decoded `batch` event; KeyError/ValueError/TypeError if a field is bad."""
    for name in BATCH_FIELDS:
        if name not in event:
            raise KeyError(name)
    end = datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()
    waits = event.get("image_wait_ms") or [event.get("queue_wait_ms", 0.0)] * int(event["images_ok"])
    record = BatchRecord(
        source=source,
        worker=str(event["worker"]),
        engine=str(event.get("engine", "")),
        batch_size=int(event["batch_size"]),
        images_ok=int(event["images_ok"]),
        fetch_ms=float(event["fetch_ms"]),
        compute_ms=float(event["compute_ms"]),
        write_ms=float(event["write_ms"]),
        total_ms=float(event["total_ms"]),
        end_s=end,
        image_wait_ms=tuple(float(w) for w in waits),
        tile_of=tuple(None if t is None else str(t) for t in (event.get("tile_of") or ())),
    )
    if record.batch_size < 0 or record.total_ms < 0 or not math.isfinite(record.end_s):
        raise ValueError("negative or non-finite field")
    return record


def read_logs(paths: list[Path]) -> LogData:
    """Read `batch` events from worker JSON-line logs; malformed lines are counted and skipped.

    Raises NoBatchLines, naming the file, for a file with no batch line that is no JSON log at all
    (the worker's console output, say), or for every file when none holds a batch line: there is
    nothing to report on. A JSON log without batches beside others (an idle worker's) is kept.
    """
    data = LogData()
    empty: list[tuple[str, bool]] = []  # files without a batch line: (name, holds any JSON object line)
    for path in paths:
        source = str(path)
        batches_before = len(data.batches)
        json_lines = _read_log(path, source, data)
        if len(data.batches) == batches_before:
            empty.append((source, json_lines > 0))
    for source, is_json in empty:
        if not is_json or not data.batches:
            raise NoBatchLines(source, data.lines[source])
    data.batches.sort(key=lambda b: b.end_s)
    return data


def _read_log(path: Path, source: str, data: LogData) -> int:
    """Add one file's batch events, line and malformed counts to `data`; returns how many lines were JSON objects."""
    data.malformed[source] = 0
    data.lines[source] = 0
    json_lines = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            data.lines[source] += 1
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
                json_lines += 1
                if event.get("event") != "batch":
                    continue
                data.batches.append(parse_batch(source, event))
            except (ValueError, KeyError, TypeError):
                data.malformed[source] += 1
    return json_lines


def busy_intervals(batches: list[BatchRecord]) -> list[tuple[float, float]]:
    """Each worker's (first batch start, last batch end), in unix seconds."""
    spans: dict[str, tuple[float, float]] = {}
    for batch in batches:
        lo, hi = spans.get(batch.worker, (batch.start_s, batch.end_s))
        spans[batch.worker] = (min(lo, batch.start_s), max(hi, batch.end_s))
    return sorted(spans.values())


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals (overlaps counted once, gaps not at all)."""
    total, current_start = 0.0, 0.0
    current_end: float | None = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


@dataclass(frozen=True)
class Throughput:
    """Images (with a mask), batches, workers, wall seconds (union of busy intervals) and images per second."""

    images: int
    batches: int
    workers: int
    wall_s: float
    img_per_s: float


def throughput(batches: list[BatchRecord]) -> Throughput:
    """Merged throughput of all workers: images over the union of their busy time."""
    images = sum(b.images_ok for b in batches)
    wall = union_seconds(busy_intervals(batches))
    workers = len({b.worker for b in batches})
    return Throughput(images, len(batches), workers, wall, images / wall if wall > 0 else float("nan"))


BATCHES_PER_BIN = 5  # the throughput plot's bins hold at least this many batches on average
MAX_BINS = 400  # and there are never more bins than a plot can show


@dataclass(frozen=True)
class ThroughputSeries:
    """Images per second in equal time bins.

    Bin i covers [starts_s[i], starts_s[i] + bin_s) since the first batch start."""

    starts_s: np.ndarray
    img_per_s: np.ndarray
    bin_s: float


def throughput_bin_seconds(batches: list[BatchRecord]) -> float:
    """Bin width for the throughput plot, from the batch rate.

    At least BATCHES_PER_BIN batches per bin on average, never narrower than the median gap between
    consecutive batch ends (all workers merged), and at most MAX_BINS bins over the run.
    """
    span = max(b.end_s for b in batches) - min(b.start_s for b in batches)
    ends = np.sort([b.end_s for b in batches])
    typical_gap = float(np.median(np.diff(ends))) if len(ends) > 1 else span
    width = max(BATCHES_PER_BIN * span / len(batches), typical_gap, span / MAX_BINS)
    return width if width > 0 else 1.0


def _ramp_sum(times: np.ndarray, points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i weights[i] * max(0, t - points[i]) for each t in `times` (sorting and cumulative sums)."""
    order = np.argsort(points)
    sorted_points, sorted_weights = points[order], weights[order]
    cum_w = np.concatenate(([0.0], np.cumsum(sorted_weights)))
    cum_wp = np.concatenate(([0.0], np.cumsum(sorted_weights * sorted_points)))
    below = np.searchsorted(sorted_points, times, side="right")
    return times * cum_w[below] - cum_wp[below]


def _step_sum(times: np.ndarray, points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i weights[i] for points[i] <= t, for each t in `times`."""
    order = np.argsort(points)
    cum_w = np.concatenate(([0.0], np.cumsum(weights[order])))
    return cum_w[np.searchsorted(points[order], times, side="right")]


def images_done_by(batches: list[BatchRecord], times: np.ndarray, t0: float) -> np.ndarray:
    """Images done by each time in `times` (seconds since t0).

    Each batch's images are spread evenly over its own [start, end], the processing time they took,
    so a batch is not a spike at its end; a batch with total_ms == 0 counts whole at its end.
    """
    starts = np.array([b.start_s - t0 for b in batches])
    ends = np.array([b.end_s - t0 for b in batches])
    images = np.array([float(b.images_ok) for b in batches])
    spread = ends > starts
    rates = images[spread] / (ends[spread] - starts[spread])
    ramps = _ramp_sum(times, starts[spread], rates) - _ramp_sum(times, ends[spread], rates)
    return ramps + _step_sum(times, ends[~spread], images[~spread])


def throughput_series(batches: list[BatchRecord], bin_s: float | None = None) -> ThroughputSeries:
    """Images per second over time, all workers together, in equal bins covering the run exactly.

    bin_s: the wanted width (default: throughput_bin_seconds); it is widened so that a whole number
    of bins spans first batch start to last batch end, so no bin is a partial one. The series' mean
    is all images over that span: the table's FPS when no worker idles between its batches.
    """
    t0 = min(b.start_s for b in batches)
    span = max(b.end_s for b in batches) - t0
    wanted = bin_s or throughput_bin_seconds(batches)
    count = max(1, int(span // wanted))
    width = span / count if span > 0 else wanted
    edges = np.linspace(0.0, count * width, count + 1)
    done = images_done_by(batches, edges, t0)
    return ThroughputSeries(edges[:-1], np.diff(done) / width, width)


def image_latencies(batches: list[BatchRecord]) -> list[float]:
    """Enqueue-to-mask latency of every image (ms). A tiled image (tiles of one `tile_of` id, all stamped with the
    time its first tile was stored) counts once: from its first tile in to its last tile's mask out."""
    latencies: list[float] = []
    tiled: dict[str, float] = {}
    for batch in batches:
        parents = batch.tile_of if len(batch.tile_of) == len(batch.image_wait_ms) else ()
        for index, ms in enumerate(batch.image_latencies_ms()):
            parent = parents[index] if parents else None
            if parent is None:
                latencies.append(ms)
            else:
                tiled[parent] = max(ms, tiled.get(parent, 0.0))
    return latencies + list(tiled.values())


def latency_percentiles(batches: list[BatchRecord], percents: tuple[int, ...] = (50, 95, 99)) -> dict[int, float]:
    """Enqueue-to-mask latency percentiles over every image (a tiled image once: `image_latencies`), in ms."""
    latencies = image_latencies(batches)
    if not latencies:
        return {p: float("nan") for p in percents}
    return {p: float(np.percentile(latencies, p)) for p in percents}


def read_binary_mask(path: Path) -> np.ndarray:
    """A mask PNG as a bool array (foreground where the gray level is >= 128)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) >= 128


def mask_files(folder: Path) -> dict[str, Path]:
    """PNG masks under `folder` by relative POSIX name."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*.png"))}


@dataclass
class DiceResult:
    """Per-file Dice of `masks` against `truth` (and against `reference`, if given), over files present in all."""

    per_file: dict[str, float]
    missing: list[str]
    reference_per_file: dict[str, float] = field(default_factory=dict)
    agreement_per_file: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_file.values()))) if self.per_file else float("nan")

    @property
    def median(self) -> float:
        return float(np.median(list(self.per_file.values()))) if self.per_file else float("nan")

    def worst(self, count: int = 5) -> list[tuple[str, float]]:
        return sorted(self.per_file.items(), key=lambda item: item[1])[:count]

    @property
    def deviation(self) -> float:
        """Mean Dice of this run minus the reference run's, both against the truth (the study's column)."""
        if not self.reference_per_file:
            return float("nan")
        return self.mean - float(np.mean(list(self.reference_per_file.values())))


def dice_against(masks: Path, truth: Path, reference: Path | None = None) -> DiceResult:
    """Compare mask folders by relative name; files missing from `masks` are listed, not scored."""
    predicted, expected = mask_files(masks), mask_files(truth)
    refs = mask_files(reference) if reference else {}
    result = DiceResult(per_file={}, missing=sorted(set(expected) - set(predicted)))
    for name in sorted(set(predicted) & set(expected)):
        truth_mask = read_binary_mask(expected[name])
        mask = read_binary_mask(predicted[name])
        if mask.shape != truth_mask.shape:
            result.missing.append(f"{name} (size {mask.shape} != truth {truth_mask.shape})")
            continue
        result.per_file[name] = dice(mask, truth_mask)
        if name in refs:
            ref_mask = read_binary_mask(refs[name])
            result.reference_per_file[name] = dice(ref_mask, truth_mask)
            result.agreement_per_file[name] = dice(mask, ref_mask)
    return result
