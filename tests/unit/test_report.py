"""report.analysis and report.writer on small worker logs written by the tests: busy-time union, parsing, throughput
series and plots. Reports from a real worker run: tests/integration/test_report_run.py."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from report.analysis import BATCHES_PER_BIN, parse_batch, read_logs, throughput, throughput_series, union_seconds
from report.writer import write_report


def table_row(markdown: str, header_start: str) -> list[str]:
    """Cells of the first data row of the table whose header starts with `header_start`."""
    lines = markdown.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    return [cell.strip() for cell in lines[index + 2].strip("|").split("|")]


def _event(worker: str, end_s: float, total_ms: float, images: int = 8) -> dict:
    return {"event": "batch", "worker": worker, "batch_size": images, "images_ok": images, "fetch_ms": 1.0,
            "compute_ms": total_ms - 2, "write_ms": 1.0, "total_ms": total_ms,
            "time": datetime.fromtimestamp(end_s, UTC).isoformat().replace("+00:00", "Z")}


def test_several_workers_merge_over_the_union_of_their_busy_time(tmp_path):
    # worker a busy 0..10 s, b 5..15 s (overlaps a), c 20..25 s (after a gap): union 20 s, 80 images.
    logs = {"a": [(1, 1000), (10, 1000)], "b": [(6, 1000), (15, 1000)], "c": [(21, 1000), (25, 1000)]}
    paths = []
    for worker, batches in logs.items():
        path = tmp_path / f"{worker}.log"
        path.write_text("".join(json.dumps(_event(worker, 1_000_000 + end, ms)) + "\n" for end, ms in batches))
        paths.append(path)
    data = read_logs(paths)
    total = throughput(data.batches)
    assert total.images == 48 and total.workers == 3
    assert total.wall_s == 20.0
    assert total.img_per_s == 48 / 20.0  # not the sum of rates (8+8)/10 + (8+8)/10 + (8+8)/5


def test_union_of_intervals():
    assert union_seconds([]) == 0.0
    assert union_seconds([(0, 10), (5, 15), (20, 25)]) == 20.0
    assert union_seconds([(0, 10), (2, 3)]) == 10.0


def test_parse_batch_reads_the_worker_line_format():
    record = parse_batch("x", _event("w", 1_000_000.0, 250.0, images=4))
    assert record.start_s == 1_000_000.0 - 0.25
    assert record.images_ok == 4


def write_log(path, batches: list[tuple[float, float]], worker: str = "w", images: int = 8):
    """A worker log of `batch` events, one per (end second, total_ms), at a fixed date."""
    path.write_text("".join(json.dumps(_event(worker, 1_800_000_000 + end, ms, images)) + "\n" for end, ms in batches))
    return path


def check_series_against_table(tmp_path, log) -> None:
    """The plotted series has no zero bin and no spike, and its mean is the report table's FPS (within 20%)."""
    data = read_logs([log])
    write_report(tmp_path / "report", data)
    table_fps = float(table_row((tmp_path / "report" / "report.md").read_text(), "workers")[4])
    series = throughput_series(data.batches)
    assert (series.img_per_s > 0).all(), series.img_per_s
    assert abs(series.img_per_s.mean() - table_fps) <= 0.2 * table_fps, (series.img_per_s.mean(), table_fps)
    assert series.img_per_s.max() <= 1.5 * table_fps, series.img_per_s
    mean_gap = (data.batches[-1].end_s - data.batches[0].start_s) / len(data.batches)
    assert series.bin_s >= BATCHES_PER_BIN * mean_gap * 0.999
    assert series.img_per_s.sum() * series.bin_s == pytest.approx(sum(b.images_ok for b in data.batches))


def test_short_run_throughput_plot_has_no_spikes_or_empty_bins(tmp_path):
    """A 6 s run, batches of 8 every 1.16 s (6.9 img/s): 1/40-of-the-run bins plotted 0 and 55 img/s."""
    log = write_log(tmp_path / "w.log", [(0.3 + 1.16 * (i + 1), 1160.0) for i in range(5)])
    check_series_against_table(tmp_path, log)


def test_longer_run_throughput_plot_is_steady_and_keeps_its_bins_wide(tmp_path):
    rng = random.Random(7)
    batches, end = [], 0.0
    for _ in range(120):  # ~95 ms batches with 0..20 ms idle between them
        total_ms = rng.uniform(85.0, 105.0)
        end += rng.uniform(0.0, 0.02) + total_ms / 1000
        batches.append((end, total_ms))
    check_series_against_table(tmp_path, write_log(tmp_path / "w.log", batches))
    series = throughput_series(read_logs([tmp_path / "w.log"]).batches)
    assert len(series.img_per_s) >= 10


def test_throughput_series_of_several_workers_counts_every_image_once():
    # the merge test's workers: a busy 0..10 s, b 5..15 s, c 20..25 s; idle 15..20 s is plotted as 0
    batches = [parse_batch("x", _event(w, 1_000_000 + end, 1000.0))
               for w, ends in {"a": (1, 10), "b": (6, 15), "c": (21, 25)}.items() for end in ends]
    series = throughput_series(batches, bin_s=1.0)
    assert series.bin_s == 1.0 and len(series.img_per_s) == 25
    assert series.img_per_s.sum() * series.bin_s == pytest.approx(48)
    assert series.img_per_s[16:19].tolist() == [0.0, 0.0, 0.0]


def test_dice_axis_fits_the_scores(tmp_path):
    """Real masks scoring 0.95-1.0 get an axis over that range, not 0.5-1.0; equal scores get a minimum span."""
    from report.analysis import dice_against
    from report.plots import DICE_MIN_SPAN, dice_axis_range

    rng = np.random.default_rng(3)
    for folder in ("truth", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(12):  # a 40x40 square; the prediction misses 0..30 of its 1,600 pixels: Dice 0.99-1.0
        truth = np.zeros((64, 64), np.uint8)
        truth[12:52, 12:52] = 255
        mask = truth.copy()
        misses = rng.choice(40 * 40, size=int(rng.integers(0, 31)), replace=False)
        mask[12 + misses // 40, 12 + misses % 40] = 0
        Image.fromarray(truth).save(tmp_path / "truth" / f"m{i}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"m{i}.png")
    scores = list(dice_against(tmp_path / "masks", tmp_path / "truth").per_file.values())
    assert len(scores) == 12 and min(scores) > 0.98
    low, high = dice_axis_range(scores)
    assert low <= min(scores) and max(scores) <= high <= 1.0
    assert high - low <= max(DICE_MIN_SPAN, 1.2 * (max(scores) - min(scores))) + 1e-9
    assert low > 0.95  # the old axis started at 0.5, leaving every bar in its last 2%
    assert dice_axis_range([1.0] * 5) == pytest.approx((1.0 - DICE_MIN_SPAN, 1.0))
    assert dice_axis_range([0.0, 0.001]) == pytest.approx((0.0, DICE_MIN_SPAN))
    assert dice_axis_range([0.2, 1.0]) == pytest.approx((0.16, 1.0))
    write_report(tmp_path / "report", read_logs([write_log(tmp_path / "w.log", [(1.0, 100.0)])]),
                 dice_against(tmp_path / "masks", tmp_path / "truth"))
    assert Image.open(tmp_path / "report" / "dice.png").size[0] > 100
