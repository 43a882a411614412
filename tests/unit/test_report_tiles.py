"""`producer report` with tiled images: a tiled image's latency counts once, from its first tile in to its last
tile's mask out (report/analysis.py `image_latencies`), read from the batch lines' `tile_of`."""

from __future__ import annotations

from report.analysis import image_latencies, latency_percentiles, parse_batch


def _batch(end: str, total_ms: float, waits: list[float], tile_of: list[str | None] | None) -> dict:
    return {"event": "batch", "worker": "w", "batch_size": len(waits), "images_ok": len(waits), "fetch_ms": 1.0,
            "compute_ms": 5.0, "write_ms": 1.0, "total_ms": total_ms, "time": end, "image_wait_ms": waits,
            "tiles": sum(1 for t in tile_of or [] if t), "tile_of": tile_of}


def test_a_tiled_image_counts_once_with_its_last_tiles_latency():
    batches = [
        parse_batch("log", _batch("2026-12-07T10:00:01Z", 100.0, [10.0, 20.0, 30.0], ["p", "p", None])),
        parse_batch("log", _batch("2026-12-07T10:00:02Z", 100.0, [900.0, 5.0], ["p", None])),
        parse_batch("log", _batch("2026-12-07T10:00:03Z", 50.0, [1.0, 2.0], None)),  # no tiles: tile_of null
    ]
    assert sorted(image_latencies(batches)) == sorted([130.0, 105.0, 51.0, 52.0, 1000.0])
    assert latency_percentiles(batches, (100,))[100] == 1000.0


def test_lines_without_tile_of_count_every_image():
    old = _batch("2026-12-07T10:00:01Z", 10.0, [1.0, 2.0], None)
    del old["tile_of"], old["tiles"]
    assert sorted(image_latencies([parse_batch("log", old)])) == [11.0, 12.0]
