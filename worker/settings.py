"""The worker's one settings object, built once from CLI options and the environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from broker.connection import BrokerSettings


def default_decode_processes(device: str, workers_here: int = 1) -> int:
    """Decode processes when --decode-processes is not given: 12 for a CUDA device, 8 otherwise, at most the
    CPUs divided among the `workers_here` workers of this host (a pool's children).

    A GPU engine needs more images decoded per second than a CPU engine; see WorkerSettings.decode_processes."""
    return min(12 if device.startswith("cuda") else 8, max(1, (os.cpu_count() or 1) // max(1, workers_here)))


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs; times in seconds unless the name says otherwise.

    job_heartbeat_ttl_s: how long a claimed job stays "started" without a heartbeat; after that a
    live worker's maintenance re-enqueues it (rq Retry). maintenance_interval_s: how often this
    worker runs rq's registry maintenance. Together they bound recovery from a dead worker at
    about job_heartbeat_ttl_s + maintenance_interval_s (10 s by default). The heartbeats come from
    their own thread every heartbeat_interval_s, so a slow batch never lets its jobs' leases lapse;
    they stop when the main loop has not passed for liveness_timeout_s (a stuck worker gives its
    jobs back).
    """

    broker: BrokerSettings
    engine_path: Path
    engine_sha256: str | None = None  # if set, the engine file must have this SHA-256 (hex) or the worker refuses it
    device: str = "cpu"
    precision: str | None = None
    engine_slots: int | None = None  # batches in flight on a CUDA engine; None: the engine's default (engines.base)
    max_batch: int = 8
    max_wait_ms: float = 20.0
    # Batches fetched ahead of the engine besides those in flight on it (at least: worker/pipeline.py
    # widens the window to twice the decode processes), and the processes that read and decode them
    # (worker/loader.py; 0: on the fetch threads): one per core, up to twelve for a GPU (a decode process
    # takes about as long for a batch of PNG payloads as the INT8 engine takes for eight batches:
    # docs/worker-measurements.md); more processes than cores would only queue for them.
    prefetch_batches: int = 8
    # Computed batches the writer thread may fall behind by before the main loop waits for it: enough to ride
    # out a Redis stall of several fast batches (a producer's burst stalled mask writes for 80-100 ms while
    # INT8 batches took 5 ms: docs/int8-gpu.md); each holds a batch's pixels and masks (about 4 MB at 512 px).
    writer_depth: int = 16
    decode_processes: int = field(default_factory=lambda: default_decode_processes("cpu"))
    burst: bool = False
    metrics_port: int | None = None  # serve /metrics, /readyz, /livez here (worker/metrics.py)
    liveness_timeout_s: float = 60.0  # /livez fails once the main loop has not passed for this long
    log_file: Path | None = None
    log_json: bool = False  # JSON lines on stdout instead of console lines on stderr (worker/logs.py)
    name: str = ""
    job_heartbeat_ttl_s: int = 8
    heartbeat_interval_s: float = 2.0  # a lease thread renews the claimed jobs this often, whatever the engine does
    maintenance_interval_s: int = 2
    idle_poll_s: float = 0.5  # longest wait for a job; a SIGTERM to an idle worker is noticed within it
    # The main loop and the writer thread both make many short Redis round trips; Python's default
    # 5 ms GIL switch interval makes each reply wait for the other thread's time slice.
    gil_switch_interval_s: float = 0.0005

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def worker_name(self) -> str:
        """A readable unique name: the given one, or host.pid."""
        return self.name or f"{socket.gethostname()}.{os.getpid()}"
