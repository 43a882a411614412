"""The worker's one settings object, built once from CLI options and the environment."""

from __future__ import annotations

import socket
import os
from dataclasses import dataclass
from pathlib import Path

from broker.connection import BrokerSettings


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs; times in seconds unless the name says otherwise.

    job_heartbeat_ttl_s: how long a claimed job stays "started" without a heartbeat; after that a
    live worker's maintenance re-enqueues it (rq Retry). maintenance_interval_s: how often this
    worker runs rq's registry maintenance. Together they bound recovery from a dead worker at
    about job_heartbeat_ttl_s + maintenance_interval_s.
    """

    broker: BrokerSettings
    engine_path: Path
    device: str = "cpu"
    precision: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 20.0
    fetch_threads: int = 2  # threads that read and decode batches from Redis
    prefetch_batches: int = 2  # batches being fetched ahead of the engine, besides those in flight on it
    burst: bool = False
    metrics_port: int | None = None  # serve /metrics, /readyz, /livez here (worker/metrics.py)
    liveness_timeout_s: float = 60.0  # /livez fails once the main loop has not passed for this long
    log_file: Path | None = None
    name: str = ""
    job_heartbeat_ttl_s: int = 40
    heartbeat_interval_s: float = 5.0
    maintenance_interval_s: int = 15
    idle_poll_s: float = 1.0
    # The main loop and the writer thread both make many short Redis round trips; Python's default
    # 5 ms GIL switch interval makes each reply wait for the other thread's time slice.
    gil_switch_interval_s: float = 0.0005

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def worker_name(self) -> str:
        """A readable unique name: the given one, or host.pid."""
        return self.name or f"{socket.gethostname()}.{os.getpid()}"
