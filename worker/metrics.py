"""Prometheus metrics and health state of one worker process (`worker run --metrics-port PORT`).

One `WorkerMetrics` per process, with its own registry (prometheus-client), fed by the pipeline (loop
beats, engine busy time, fetch and engine times, Redis errors) and the writer thread (one
`observe_batch` per batch). worker/metrics_server.py serves it over HTTP (/metrics, /readyz, /livez,
/startupz); every series is listed in docs/operations.md ("Metrics").

Latencies are in seconds, as Prometheus names them. Engine time: the engine runs one batch at a time,
so a batch submitted while the one before it still runs waits for it: `segqueue_engine_queued_seconds`
is that wait and `segqueue_engine_compute_seconds` the rest (its own compute); `segqueue_compute_seconds`
is their sum. Busy share: the engine counts as busy while at least one batch is in flight on it;
`rate(segqueue_engine_busy_seconds_total[1m])` is the busy share (0..1), `segqueue_engine_busy_share`
the same over the last `busy_window_s` seconds, computed by the worker itself.

Health: ready (engine loaded and warmed up, and Redis answering), alive (the main loop passed within
`liveness_timeout_s`; always alive while the engine loads: the startup probe guards loading) and
started (engine loaded and warmed up, whatever Redis does).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)
BUSY_WINDOW_S = 60.0


class WorkerMetrics:
    """The worker's counters, histograms and gauges, and its readiness/liveness state. Thread-safe.

    queue_depth: called at each scrape, returns the jobs waiting in the queue (None: unknown).
    clock: monotonic seconds (a fake one in unit tests). busy_window_s: the window of
    `segqueue_engine_busy_share`. The callables set with `watch` are read at each scrape.
    """

    def __init__(self, queue_depth: Callable[[], int | None] = lambda: None,
                 liveness_timeout_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 busy_window_s: float = BUSY_WINDOW_S) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = queue_depth  # replaceable: the worker sets it once its job source exists
        self.redis_check: Callable[[], str | None] = lambda: None  # why Redis is unusable now (None: it answers)
        self.clock = clock
        self.liveness_timeout_s = liveness_timeout_s
        self.busy_window_s = busy_window_s
        self._lock = threading.Lock()
        self._ready = False
        self._last_beat = clock()
        self._started = clock()
        self._busy_since: float | None = None
        self._busy_intervals: deque[tuple[float, float]] = deque()  # closed (start, end) within the window
        self._engine_free_at = 0.0  # perf_counter seconds when the engine finished its last batch
        self._watched: dict[str, Callable[[], float]] = {}
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.images = Counter("segqueue_images", "Images processed, by outcome (ok: a mask was written).",
                              ["outcome"], registry=r)
        self.jobs = Counter("segqueue_jobs", "Jobs completed, by outcome.", ["outcome"], registry=r)
        self.batches = Counter("segqueue_batches", "Batches written.", registry=r)
        self.batch_size = Histogram("segqueue_batch_size", "Images per batch.", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.queue_wait = Histogram("segqueue_queue_wait_seconds", "Per image: enqueue until its batch was taken.",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.fetch = Histogram("segqueue_fetch_seconds", "Per batch: reading its images from Redis and decoding them.",
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.compute = Histogram("segqueue_compute_seconds", "Per batch: submit to the engine until masks are ready "
                                 "(engine_queued + engine_compute).", buckets=LATENCY_BUCKETS_S, registry=r)
        self.engine_queued = Histogram("segqueue_engine_queued_seconds", "Per batch: submitted until the batch "
                                       "before it left the engine (0 if the engine was free).",
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.engine_compute = Histogram("segqueue_engine_compute_seconds", "Per batch: the engine's own time, from "
                                        "when it could start the batch until its masks were ready.",
                                        buckets=LATENCY_BUCKETS_S, registry=r)
        self.end_to_end = Histogram("segqueue_end_to_end_seconds", "Per image: enqueue until its mask is written.",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.busy = Counter("segqueue_engine_busy_seconds", "Seconds with at least one batch in flight on the engine.",
                            registry=r)
        self.redis_errors = Counter("segqueue_redis_errors", "Redis connection errors and timeouts ridden out, by "
                                    "where they happened (loop, leases).", ["where"], registry=r)
        for counter, labels in ((self.images, ("ok", "failed")), (self.jobs, ("finished", "failed", "retried")),
                                (self.redis_errors, ("loop", "leases"))):
            for label in labels:  # every series exported from the start, at 0 (not only after its first event)
                counter.labels(label)
        self.engine_info = Info("segqueue_engine", "The loaded engine: file, format, device, precision, input size, "
                                "batch bounds.", registry=r)
        Gauge("segqueue_engine_busy_share", f"Share of the last {busy_window_s:.0f} s with a batch in flight (0..1).",
              registry=r).set_function(self.busy_share)
        Gauge("segqueue_queue_depth", "Jobs waiting in the queue (-1: unknown).",
              registry=r).set_function(lambda: _or_minus_one(self.queue_depth))
        Gauge("segqueue_ready", "1 while /readyz answers 200 (engine warm, Redis answering).",
              registry=r).set_function(lambda: float(self.readiness()[0]))
        Gauge("segqueue_batches_in_flight", "Batches submitted to the engine and not yet finished.",
              registry=r).set_function(lambda: self._read("in_flight"))
        Gauge("segqueue_images_claimed", "Images of jobs this worker holds (claimed, not yet written).",
              registry=r).set_function(lambda: self._read("claimed"))

    # --- fed by the worker ---------------------------------------------------------------------

    def set_ready(self) -> None:
        """The engine is loaded and a warm-up batch has run; liveness is measured from now on."""
        with self._lock:
            self._ready = True
            self._last_beat = self.clock()

    def set_engine(self, labels: Mapping[str, object]) -> None:
        """The loaded engine's description (segqueue_engine_info)."""
        self.engine_info.info({key: str(value) for key, value in labels.items()})

    def watch(self, **readers: Callable[[], float]) -> None:
        """Gauges read at scrape time: in_flight (batches on the engine), claimed (images held)."""
        with self._lock:
            self._watched.update(readers)

    def add_collector(self, collector: Collector) -> None:
        """Register another collector (GPU, backlog) on this worker's registry."""
        self.registry.register(collector)

    def beat(self) -> None:
        """The main loop passed (called once per loop step)."""
        with self._lock:
            self._last_beat = self.clock()

    def redis_error(self, where: str) -> None:
        """A Redis connection error or timeout the worker rides out."""
        self.redis_errors.labels(where).inc()

    def engine_busy(self, busy: bool) -> None:
        """Whether at least one batch is in flight on the engine now (called on every change)."""
        with self._lock:
            now = self.clock()
            if busy and self._busy_since is None:
                self._busy_since = now
            elif not busy and self._busy_since is not None:
                self.busy.inc(now - self._busy_since)
                self._busy_intervals.append((self._busy_since, now))
                self._busy_since = None
                self._forget_before(now - self.busy_window_s)

    def observe_engine(self, submitted_at: float, finished_at: float) -> None:
        """One batch left the engine: split submit-to-result into waiting for the batch before it and its own
        compute (perf_counter seconds; batches finish in submission order)."""
        with self._lock:
            started = max(submitted_at, min(self._engine_free_at, finished_at))
            self._engine_free_at = finished_at
        self.engine_queued.observe(started - submitted_at)
        self.engine_compute.observe(finished_at - started)

    def observe_batch(self, images_ok: int, images_failed: int, jobs_completed: int, jobs_failed: int,
                      image_wait_s: list[float], compute_s: float, total_s: float,
                      fetch_s: float | None = None) -> None:
        """One written batch: counts, its size, per-image waits, fetch, compute and per-image end-to-end latency."""
        self.batches.inc()
        self.images.labels("ok").inc(images_ok)
        self.images.labels("failed").inc(images_failed)
        self.jobs.labels("finished").inc(jobs_completed)
        self.jobs.labels("failed").inc(jobs_failed)
        self.batch_size.observe(images_ok + images_failed)
        self.compute.observe(compute_s)
        if fetch_s is not None:
            self.fetch.observe(fetch_s)
        for wait in image_wait_s:
            self.queue_wait.observe(wait)
            self.end_to_end.observe(wait + total_s)

    # --- read by the endpoints -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Engine loaded and warmed up (the startup probe's question)."""
        with self._lock:
            return self._ready

    def readiness(self) -> tuple[bool, str]:
        """(ready to serve, why not): the engine is warm and Redis answers."""
        if not self.ready:
            return False, "engine loading"
        problem = self.redis_check()
        return (False, f"redis unreachable: {problem}") if problem else (True, "ready")

    def alive(self) -> bool:
        """Whether the main loop has passed within liveness_timeout_s (always, while the engine loads)."""
        with self._lock:
            return not self._ready or self.clock() - self._last_beat <= self.liveness_timeout_s

    def busy_share(self) -> float:
        """Share of the last busy_window_s seconds (or of the life so far, if shorter) with a batch in flight."""
        with self._lock:
            now = self.clock()
            since = now - self.busy_window_s
            self._forget_before(since)
            busy = sum(end - max(start, since) for start, end in self._busy_intervals)
            if self._busy_since is not None:
                busy += now - max(self._busy_since, since)
            return busy / max(min(self.busy_window_s, now - self._started), 1e-9)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    # --- inside ---------------------------------------------------------------------------------

    def _forget_before(self, since: float) -> None:
        while self._busy_intervals and self._busy_intervals[0][1] <= since:
            self._busy_intervals.popleft()

    def _read(self, name: str) -> float:
        with self._lock:
            reader = self._watched.get(name)
        return 0.0 if reader is None else float(reader())


def _or_minus_one(read: Callable[[], int | None]) -> float:
    try:
        value = read()
    except Exception:  # a scrape must not fail because Redis is briefly away
        return -1.0
    return -1.0 if value is None else float(value)


class CallbackGauges(Collector):
    """Gauges whose values one callable gives at each scrape, as {name: (help, value)}; none if it fails."""

    def __init__(self, read: Callable[[], Mapping[str, tuple[str, float]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self._read()
        except Exception:  # Redis away, NVML gone: the series are absent from this scrape, the scrape works
            return
        for name, (help_text, value) in values.items():
            yield GaugeMetricFamily(name, help_text, value=value)
