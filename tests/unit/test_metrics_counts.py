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
    assert metrics.busy_share() == pytest.approx(30 / 40)  # the worker's 40 s of life, shorter than the window
    assert metrics.alive()  # 40 s without a beat, but still loading: the startup probe guards loading, not /livez
    metrics.set_ready()
    assert metrics.alive()
    clock.now += 31
    assert not metrics.alive()
    metrics.beat()
    assert metrics.alive()


def test_an_unreadable_queue_depth_is_minus_one_not_a_failed_scrape() -> None:
    def broken() -> int:
        raise ConnectionError("redis away")

    metrics = WorkerMetrics(queue_depth=broken)
    assert sample(metrics, "segqueue_queue_depth") == -1


def test_busy_share_is_over_the_recent_window_not_the_whole_life() -> None:
    clock = FakeClock()
    metrics = WorkerMetrics(clock=clock, busy_window_s=60)
    metrics.engine_busy(True)
    clock.now += 600  # busy for ten minutes
    metrics.engine_busy(False)
    clock.now += 30
    assert metrics.busy_share() == pytest.approx(30 / 60)  # the last minute: 30 s busy
    clock.now += 30
    assert metrics.busy_share() == pytest.approx(0)  # over the life it would be 600/660
    metrics.engine_busy(True)
    clock.now += 15
    assert sample(metrics, "segqueue_engine_busy_share") == pytest.approx(15 / 60)  # an open interval counts


def test_engine_time_is_split_into_queued_behind_the_batch_before_and_own_compute() -> None:
    metrics = WorkerMetrics()
    metrics.observe_engine(submitted_at=10.0, finished_at=11.0)  # engine free: 1 s compute, no wait
    metrics.observe_engine(submitted_at=10.1, finished_at=12.0)  # waited for the first until 11.0
    metrics.observe_engine(submitted_at=20.0, finished_at=20.5)  # engine free again
    assert sample(metrics, "segqueue_engine_queued_seconds_sum") == pytest.approx(0.9)
    assert sample(metrics, "segqueue_engine_compute_seconds_sum") == pytest.approx(1.0 + 1.0 + 0.5)
    assert sample(metrics, "segqueue_engine_compute_seconds_count") == 3


def test_readiness_needs_the_engine_and_redis() -> None:
    metrics = WorkerMetrics()
    problem: list[str | None] = [None]
    metrics.redis_check = lambda: problem[0]
    assert metrics.readiness() == (False, "engine loading")
    metrics.set_ready()
    assert metrics.readiness() == (True, "ready")
    problem[0] = "ConnectionError"
    ok, reason = metrics.readiness()
    assert not ok and "redis unreachable" in reason and sample(metrics, "segqueue_ready") == 0
    assert metrics.ready  # the startup probe's question does not depend on Redis


def test_process_metrics_in_the_workers_own_registry_and_watched_gauges() -> None:
    metrics = WorkerMetrics()
    assert sample(metrics, "process_resident_memory_bytes") > 0
    assert sample(metrics, "python_info", {"implementation": "CPython", "major": "3",
                                           "minor": str(__import__("sys").version_info.minor),
                                           "patchlevel": str(__import__("sys").version_info.micro),
                                           "version": __import__("platform").python_version()}) == 1
    metrics.watch(in_flight=lambda: 2, claimed=lambda: 24)
    assert sample(metrics, "segqueue_batches_in_flight") == 2 and sample(metrics, "segqueue_images_claimed") == 24
    metrics.redis_error("loop")
    assert sample(metrics, "segqueue_redis_errors_total", {"where": "loop"}) == 1
    metrics.set_engine({"name": "onnxruntime:cpu fp32 x.onnx", "precision": "fp32"})
    assert sample(metrics, "segqueue_engine_info", {"name": "onnxruntime:cpu fp32 x.onnx", "precision": "fp32"}) == 1
    metrics.observe_batch(1, 0, 1, 0, [0.1], 0.2, 0.3, fetch_s=0.05)
    assert sample(metrics, "segqueue_fetch_seconds_sum") == pytest.approx(0.05)
