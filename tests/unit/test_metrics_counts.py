"""worker/metrics.py: counters, busy share and liveness with a fake clock.

The HTTP endpoints, served for real: tests/integration/test_metrics.py."""

from __future__ import annotations

import pytest

from tests.helpers import FakeClock
from worker.metrics import WorkerMetrics


def sample(metrics: WorkerMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, f"no sample {name} {labels}"
    return value


def test_batches_feed_counts_and_histograms() -> None:
    metrics = WorkerMetrics(queue_depth=lambda: 7)
    metrics.observe_batch(images_ok=7, images_failed=1, jobs_completed=2, jobs_failed=1,
                          image_wait_s=[0.5] * 8, compute_s=0.02, total_s=0.1)
    assert sample(metrics, "segqueue_images_total", {"outcome": "ok"}) == 7
    assert sample(metrics, "segqueue_images_total", {"outcome": "failed"}) == 1
    assert sample(metrics, "segqueue_jobs_total", {"outcome": "finished"}) == 2
    assert sample(metrics, "segqueue_jobs_total", {"outcome": "failed"}) == 1
    assert sample(metrics, "segqueue_batch_size_sum") == 8 and sample(metrics, "segqueue_batch_size_count") == 1
    assert sample(metrics, "segqueue_queue_wait_seconds_count") == 8
    assert sample(metrics, "segqueue_end_to_end_seconds_sum") == pytest.approx(8 * 0.6)
    assert sample(metrics, "segqueue_compute_seconds_sum") == pytest.approx(0.02)
    assert sample(metrics, "segqueue_queue_depth") == 7


def test_busy_share_and_liveness_follow_the_clock() -> None:
    clock = FakeClock()
    metrics = WorkerMetrics(liveness_timeout_s=30, clock=clock)
    clock.now += 10
    metrics.engine_busy(True)
    clock.now += 30
    metrics.engine_busy(True)  # still busy: no double count
    metrics.engine_busy(False)
    assert sample(metrics, "segqueue_engine_busy_seconds_total") == pytest.approx(30)
    assert metrics.busy_share() == pytest.approx(30 / 40)
    assert not metrics.alive()  # 40 s since the last beat (at start)
    metrics.beat()
    assert metrics.alive()
    clock.now += 31
    assert not metrics.alive()


def test_an_unreadable_queue_depth_is_minus_one_not_a_failed_scrape() -> None:
    def broken() -> int:
        raise ConnectionError("redis away")

    metrics = WorkerMetrics(queue_depth=broken)
    assert sample(metrics, "segqueue_queue_depth") == -1
