"""What `worker run` adds to its metrics once it is connected: the Redis readiness check, the GPU's NVML
gauges, the queue's backlog (the autoscaling signal) and the engine's description."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import redis
import structlog

from broker.backlog import read_backlog
from engines.base import Engine
from worker.gpu_metrics import gpu_collector
from worker.metrics import CallbackGauges, WorkerMetrics
from worker.probes import RedisProbe


def backlog_gauges(client: redis.Redis, queue: str) -> Mapping[str, tuple[str, float]]:
    """The backlog gauges of broker/backlog.py, read at scrape time (absent from a scrape while Redis is away)."""
    backlog = read_backlog(client, queue)
    return {
        "segqueue_backlog_images": ("Images still to process on this queue: to send + queued + claimed (the "
                                    "autoscaling signal; every worker exports the same value).", backlog.total),
        "segqueue_backlog_to_send_images": ("Files live producers have found and not stored yet.", backlog.to_send),
        "segqueue_backlog_queued_images": ("Images stored and not in a claimed job.", backlog.queued),
        "segqueue_backlog_claimed_images": ("Images of claimed jobs without an outcome.", backlog.claimed),
        "segqueue_backlog_producers": ("Producers with files still to send.", backlog.producers),
    }


def instrument(metrics: WorkerMetrics, client: redis.Redis, queue: str, gpu: str | None,
               log: structlog.stdlib.BoundLogger) -> RedisProbe:
    """Add the Redis check, the backlog gauges and (on a GPU, when NVML is there) the GPU gauges to `metrics`.

    gpu: the physical GPU id the worker is pinned to (None on CPU). Returns the probe, to close at exit.
    """
    probe = RedisProbe(client)
    metrics.redis_check = probe.problem
    metrics.add_collector(CallbackGauges(lambda: backlog_gauges(client, queue)))
    collector, why = gpu_collector(gpu)
    if collector is not None:
        metrics.add_collector(collector)
    elif gpu is not None:
        log.warning("gpu_metrics_off", reason=why)
    return probe


def engine_labels(engine: Engine, engine_path: Path, device: str) -> dict[str, object]:
    """segqueue_engine_info's labels for a loaded engine."""
    spec = engine.spec
    return {"name": engine.name, "file": engine_path, "device": device, "precision": spec.precision,
            "input": f"{spec.height}x{spec.width}", "batch": f"{spec.min_batch}-{spec.max_batch}"}
