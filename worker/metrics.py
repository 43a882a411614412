"""Prometheus metrics and health endpoints of one worker process (`worker run --metrics-port PORT`).

One `WorkerMetrics` per process, with its own registry (prometheus-client), fed by the pipeline (loop
beats, engine busy time) and the writer thread (one `observe_batch` per batch). `MetricsServer`
serves, on a daemon thread:

    /metrics  Prometheus text format
    /readyz   200 once the engine is loaded and a warm-up batch has run, else 503
    /livez    200 while the main loop has passed within `liveness_timeout_s`, else 503 (stuck)

Latencies are in seconds, as Prometheus names them. GPU busy share: the engine counts as busy while
at least one batch is in flight on it; `segqueue_engine_busy_seconds_total` grows by that time, so
`rate(segqueue_engine_busy_seconds_total[1m])` is the busy share (0..1); the gauge
`segqueue_engine_busy_share` gives it over the worker's life.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)


class WorkerMetrics:
    """The worker's counters, histograms and gauges, and its readiness/liveness state. Thread-safe.

    queue_depth: called at each scrape, returns the jobs waiting in the queue (None: unknown).
    clock: monotonic seconds (a fake one in unit tests).
    """

    def __init__(self, queue_depth: Callable[[], int | None] = lambda: None,
                 liveness_timeout_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = queue_depth  # replaceable: the worker sets it once its job source exists
        self.clock = clock
        self.liveness_timeout_s = liveness_timeout_s
        self._lock = threading.Lock()
        self._ready = False
        self._last_beat = clock()
        self._started = clock()
        self._busy_since: float | None = None
        self._busy_s = 0.0
        r = self.registry
        self.images = Counter("segqueue_images", "Images processed, by outcome (ok: a mask was written).",
                              ["outcome"], registry=r)
        self.jobs = Counter("segqueue_jobs", "Jobs completed, by outcome.", ["outcome"], registry=r)
        self.batches = Counter("segqueue_batches", "Batches written.", registry=r)
        self.batch_size = Histogram("segqueue_batch_size", "Images per batch.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.queue_wait = Histogram("segqueue_queue_wait_seconds", "Per image: enqueue until its batch was taken.",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.compute = Histogram("segqueue_compute_seconds", "Per batch: submit to the engine until masks are ready.",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.end_to_end = Histogram("segqueue_end_to_end_seconds", "Per image: enqueue until its mask is written.",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.busy = Counter("segqueue_engine_busy_seconds", "Seconds with at least one batch in flight on the engine.",
                            registry=r)
        Gauge("segqueue_engine_busy_share", "Share of the worker's life with a batch in flight (0..1).",
              registry=r).set_function(self.busy_share)
        Gauge("segqueue_queue_depth", "Jobs waiting in the queue (-1: unknown).",
              registry=r).set_function(lambda: _or_minus_one(self.queue_depth))
        Gauge("segqueue_ready", "1 once the engine is loaded and warmed up.", registry=r).set_function(
            lambda: float(self.ready))

    # --- fed by the worker ---------------------------------------------------------------------

    def set_ready(self) -> None:
        """The engine is loaded and a warm-up batch has run."""
        with self._lock:
            self._ready = True

    def beat(self) -> None:
        """The main loop passed (called once per loop step)."""
        with self._lock:
            self._last_beat = self.clock()

    def engine_busy(self, busy: bool) -> None:
        """Whether at least one batch is in flight on the engine now (called on every change)."""
        with self._lock:
            now = self.clock()
            if busy and self._busy_since is None:
                self._busy_since = now
            elif not busy and self._busy_since is not None:
                elapsed = now - self._busy_since
                self._busy_since = None
                self._busy_s += elapsed
                self.busy.inc(elapsed)

    def observe_batch(self, images_ok: int, images_failed: int, jobs_completed: int, jobs_failed: int,
                      image_wait_s: list[float], compute_s: float, total_s: float) -> None:
        """One written batch: counts, its size, per-image waits, compute and per-image end-to-end latency."""
        self.batches.inc()
        self.images.labels("ok").inc(images_ok)
        self.images.labels("failed").inc(images_failed)
        self.jobs.labels("finished").inc(jobs_completed)
        self.jobs.labels("failed").inc(jobs_failed)
        self.batch_size.observe(images_ok + images_failed)
        self.compute.observe(compute_s)
        for wait in image_wait_s:
            self.queue_wait.observe(wait)
            self.end_to_end.observe(wait + total_s)

    # --- read by the endpoints -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Engine loaded and warmed up."""
        with self._lock:
            return self._ready

    def alive(self) -> bool:
        """Whether the main loop has passed within liveness_timeout_s."""
        with self._lock:
            return self.clock() - self._last_beat <= self.liveness_timeout_s

    def busy_share(self) -> float:
        """Share of the time since start with a batch in flight (0..1)."""
        with self._lock:
            now = self.clock()
            busy = self._busy_s + (now - self._busy_since if self._busy_since is not None else 0.0)
            return busy / max(now - self._started, 1e-9)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def _or_minus_one(read: Callable[[], int | None]) -> float:
    try:
        value = read()
    except Exception:  # a scrape must not fail because Redis is briefly away
        return -1.0
    return -1.0 if value is None else float(value)


class MetricsServer:
    """HTTP server for /metrics, /readyz and /livez on a daemon thread. `close()` stops it."""

    def __init__(self, metrics: WorkerMetrics, port: int, host: str = "0.0.0.0") -> None:
        handler = _handler_for(metrics)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _handler_for(metrics: WorkerMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/readyz":
                ok = metrics.ready
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready: engine loading\n")
            elif path == "/livez":
                ok = metrics.alive()
                self._reply(200 if ok else 503, b"alive\n" if ok else b"stuck: the worker loop has not passed\n")
            else:
                self._reply(404, b"not found: try /metrics, /readyz or /livez\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # scrapes are not worth a log line each
            return

    return Handler
