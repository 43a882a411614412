"""The worker's main loop: claim jobs -> batch images across jobs -> fetch -> submit to the engine.

Up to `engine.slots` batches are in flight on the engine, and up to `fetch_window` more are
being fetched and decoded, each on a fetch thread of its own (`prefetch_batches`, or twice the decode
processes if more: jobs are claimed when half the window is free, and the other half keeps every
decode process busy meanwhile): while the engine computes batch k, batches
k+1 and k+2 are read from Redis and decompressed, a claim thread claims the jobs after them (the main
thread only waits for a claim when it has nothing else to do), and
the writer thread (worker/writer.py) writes batch k-1's masks and completes its jobs, so Redis I/O
and payload decoding overlap compute (done on the main thread, they set the pace instead of the GPU:
docs/worker-measurements.md). Each fetch thread hands its batch to an image loader (worker/loader.py):
by default one of the decode processes (worker/settings.py), which reads the images from Redis and
decodes them with a GIL of its own.

One image's problem (missing, malformed, wrong size) fails that image alone; an engine error fails the
jobs of that batch, which rq then retries (`Retry`); a Redis outage is ridden out with a bounded backoff.
Every batch logs one `batch` line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import redis
import structlog

from broker.store import QueueStore, now
from engines.base import Engine, InFlight
from worker.batch import BatchItem, FetchedBatch, MainThreadWaits, claims_of
from worker.batcher import Batcher
from worker.claims import OpenClaims
from worker.job_source import Claim, JobSource
from worker.loader import ImageLoader, LoaderDied, ThreadImageLoader
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings
from worker.signals import StopFlag
from worker.writer import ComputedBatch, ResultWriter, abandon

MAX_REDIS_BACKOFF_S = 10.0
DRY_QUEUE_RETRY_S = 0.01  # a claim ahead that found no job holds the next one back this long


@dataclass(frozen=True)
class Fetch:
    """A fetch thread's result: the batch, and the (N, H, W) uint8 array of its good images (None if none)."""

    batch: FetchedBatch
    pixels: np.ndarray | None


@dataclass(frozen=True)
class SubmittedBatch:
    """A batch on the engine: its masks come from `inflight` (None: no usable image); submitted_at in
    time.perf_counter() seconds; the main thread's waits so far (engine_wait_ms comes at its finish)."""

    batch: FetchedBatch
    inflight: InFlight | None
    submitted_at: float
    waits: MainThreadWaits


class BatchPipeline:
    """Runs one worker until its queue is drained (`burst`) or it is asked to stop.

    The main thread batches, fetches and submits; a claim thread claims jobs ahead, a ResultWriter thread
    writes masks and completes jobs. Both reach the queue only through `source`; `stop` is set by a stop request.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        source: JobSource,
        client: redis.Redis,
        log: structlog.stdlib.BoundLogger,
        stop: StopFlag,
        clock: Callable[[], float] = time.monotonic,
        metrics: WorkerMetrics | None = None,
        loader: ImageLoader | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics(clock=clock)
        self.engine = engine
        self.source = source
        self.stop = stop
        self.store = QueueStore(client, settings.broker.queue)
        self.loader = loader or ThreadImageLoader(self.store)
        self.log = log
        self.clock = clock
        self.batcher: Batcher[BatchItem] = Batcher(settings.max_batch, settings.max_wait_s, clock)
        self.inflight: deque[SubmittedBatch] = deque()
        self.fetching: deque[tuple[list[BatchItem], Future[Fetch]]] = deque()
        self.fetch_window = max(settings.prefetch_batches, 2 * self.loader.processes)
        self.fetcher = ThreadPoolExecutor(self.fetch_window, thread_name_prefix="fetch")
        self.claimer = ThreadPoolExecutor(1, thread_name_prefix="claim")
        self._claiming: Future[list[Claim]] | None = None  # the claim running on the claim thread, if any
        self._dry_until = 0.0  # clock() before which no claim ahead starts: the last one found the queue empty
        self.claims = OpenClaims()
        self.writer = ResultWriter(self.store, source, self.claims, log, clock, depth=settings.writer_depth,
                                   metrics=self.metrics, write_masks=self.loader.write_masks)
        self._halt = threading.Event()
        self._leases = threading.Thread(target=self._renew_leases, name="job-leases", daemon=True)
        self._images_per_job = self.settings.max_batch  # until a job is seen: claim one at a time
        self._claim_s = self._handover_s = 0.0  # the main thread's, since the last submit (MainThreadWaits)
        self.metrics.watch(in_flight=lambda: len(self.inflight),
                           claimed=lambda: sum(len(claim.image_ids) for claim in self.claims.snapshot()))

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Process jobs until done; returns the number of images that got a mask."""
        started = self.clock()
        backoff_s = 0.5
        saved_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.settings.gil_switch_interval_s)
        self._leases.start()
        try:
            while True:
                try:
                    if not self._step():
                        break
                    backoff_s = 0.5
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # Redis restarting or unreachable: keep the claimed work, retry with a bounded backoff.
                    self.log.warning("redis_unavailable", error=str(exc), retry_in_s=backoff_s)
                    self.metrics.redis_error("loop")
                    time.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, MAX_REDIS_BACKOFF_S)
        finally:
            self.claimer.shutdown(wait=True, cancel_futures=True)
            self.fetcher.shutdown(wait=True, cancel_futures=True)
            self.writer.close()
            self._halt.set()
            self._leases.join(timeout=30)
            sys.setswitchinterval(saved_interval)
        elapsed = self.clock() - started
        self.log.info("worker_drained", images=self.writer.images_done, batches=self.writer.batches_done,
                      seconds=round(elapsed, 3))
        return self.writer.images_done

    def _step(self) -> bool:
        """One pass of the loop: claim and start fetches, submit, finish or wait. False when the worker should stop."""
        self.metrics.beat()
        self.source.maintain()  # the source runs it only when due
        self._start_fetches()
        if self.fetching and len(self.inflight) < self.engine.slots:
            self._submit(*self.fetching.popleft())
            return True
        if self.inflight:
            self._finish(self.inflight.popleft())
            return True
        if self._claiming is not None:  # nothing else to do: wait for the claim under way
            self._take_claims(wait=True)
            return True
        if self.stop.requested:
            return False
        return self._wait_for_work()

    def _start_fetches(self) -> None:
        """Take claimed jobs, start fetching full batches (any batch, on a stop) until fetch_window are
        fetching, and claim more.

        Jobs are claimed when no more than half of fetch_window are fetching, then for every free
        fetch slot at once (`_claim_ahead`): one claim (three round trips however many jobs) per
        half-window of batches instead of one per batch, the most claimed ahead being the same. The
        claim runs on the claim thread; its jobs join the batcher at a later pass, which fetches them.
        """
        self._take_claims(wait=False)
        while len(self.fetching) < self.fetch_window and (
                self.batcher.ready() or (self.stop.requested and len(self.batcher))):
            items = self.batcher.take()
            self.fetching.append((items, self.fetcher.submit(self._fetch, items, self.clock())))
        if not self.stop.requested and len(self.fetching) <= self.fetch_window // 2:
            self._claim_ahead()

    def _renew_leases(self) -> None:
        """Lease thread: heartbeat the worker and its open jobs every heartbeat interval until the run ends.

        Independent of the main loop, so a slow batch keeps its jobs; but only while the main loop
        is alive (metrics.alive), so a stuck worker lets its leases lapse and others recover the jobs.
        """
        interval = max(0.01, self.settings.heartbeat_interval_s)
        while not self._halt.wait(interval):
            if not self.metrics.alive():
                continue
            try:
                self.source.keep_alive(self.claims.snapshot())
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.log.warning("lease_renewal_failed", error=str(exc))
                self.metrics.redis_error("leases")

    def _claim_ahead(self) -> None:
        """Start claiming queued jobs (without waiting for any) on the claim thread, unless a claim is under
        way or a full batch of images already waits for every free fetch slot.

        Jobs are claimed several at a time when they are small: as many as the missing images need
        at the size of the last job seen, so large jobs are still claimed one by one (no hoarding).
        """
        missing = (self.fetch_window - len(self.fetching)) * self.settings.max_batch - len(self.batcher)
        if self._claiming is None and missing > 0 and self.clock() >= self._dry_until:
            self._claiming = self.claimer.submit(self._claim_held, max(1, missing // self._images_per_job))

    def _claim_held(self, max_jobs: int, timeout_s: float = 0.0) -> list[Claim]:
        """Claim up to `max_jobs` queued jobs, waiting at most `timeout_s` for the first, and hold them open at
        once (the lease thread heartbeats them even before the main loop batches them). Claims ahead run it on
        the claim thread; the main loop, when it waits for work."""
        claims = self.source.claim(max_jobs, timeout_s=timeout_s)
        for claim in claims:
            self.claims.add(claim)
        return claims

    def _take_claims(self, wait: bool) -> None:
        """Put the jobs of the claim under way into the batcher once it is done (or, with `wait`, when it is);
        a claim that found none holds the next one back for DRY_QUEUE_RETRY_S (until then the loop waits for work
        as without claims ahead). Its errors (Redis down) are raised here."""
        claiming = self._claiming
        if claiming is None or not (wait or claiming.done()):
            return
        started = time.perf_counter()
        self._claiming = None
        try:
            claims = claiming.result()
        finally:
            self._claim_s += time.perf_counter() - started
        for claim in claims:
            self._batch(claim)
        if not claims:
            self._dry_until = self.clock() + DRY_QUEUE_RETRY_S

    def _wait_for_work(self) -> bool:
        """Nothing to compute: wait (bounded) for the next job. False means: stop (burst, queue empty)."""
        if len(self.batcher):
            timeout_s = min(self.batcher.time_left(), self.settings.idle_poll_s)
        else:
            timeout_s = 0.0 if self.settings.burst else self.settings.idle_poll_s
        claims = self._claim_held(1, timeout_s)
        for claim in claims:
            self._batch(claim)
        if claims or len(self.batcher):
            return True
        self.source.maintain()
        return not self.settings.burst

    def _batch(self, claim: Claim) -> None:
        """Put an open claim's images into the batcher."""
        self._images_per_job = max(1, len(claim.image_ids))
        for image_id in claim.image_ids:
            self.batcher.add(BatchItem(claim, image_id))

    # --- one batch -------------------------------------------------------------------------

    def _fetch(self, items: list[BatchItem], taken_at: float) -> Fetch:
        """On a fetch thread: read and decode a batch's pixels, and set aside unusable images."""
        fetch_start = time.perf_counter()
        records = {item.image_id: item.claim.records[item.image_id] for item in items
                   if item.image_id in item.claim.records}  # read with the claim: not read again
        loaded = self.loader.load([item.image_id for item in items], records)
        good_items, images, rejected = [], [], []
        spec = self.engine.spec
        for item, image in zip(items, loaded, strict=True):
            if isinstance(image, str):
                rejected.append((item, image))
            elif image.pixels.shape != (spec.height, spec.width):
                h, w = image.pixels.shape
                rejected.append((item, f"image {image.name} is stored at {h}x{w} but the engine expects "
                                       f"{spec.height}x{spec.width}: enqueue it again with --size {spec.height}"))
            else:
                good_items.append(item)
                images.append(image)
        pixels = np.stack([image.pixels for image in images]) if images else None
        taken_wall = now()
        batch = FetchedBatch(
            items=good_items,
            images=images,
            rejected=rejected,
            taken_at=taken_at,
            fetch_ms=(time.perf_counter() - fetch_start) * 1000,
            image_wait_ms=[round(max(0.0, taken_wall - image.enqueued_at) * 1000, 1) for image in images],
        )
        return Fetch(batch, pixels)

    def _submit(self, items: list[BatchItem], fetch: Future[Fetch]) -> None:
        """Wait for a batch's fetch (bounded by the Redis socket timeout) and hand its images to the engine."""
        waiting_since = time.perf_counter()
        try:
            fetched = fetch.result()
        except redis.RedisError as exc:
            abandon(self.log, self.claims, items, f"redis error while fetching images: {exc}")
            raise
        except LoaderDied as exc:
            abandon(self.log, self.claims, items, str(exc))
            raise
        submitted_at, inflight = time.perf_counter(), None
        waits = MainThreadWaits(claim_ms=self._claim_s * 1000, handover_ms=self._handover_s * 1000,
                                fetch_wait_ms=(submitted_at - waiting_since) * 1000)
        self._claim_s = self._handover_s = 0.0
        if fetched.pixels is not None:
            try:
                inflight = self.engine.submit(fetched.pixels)
            except Exception as exc:  # the engine refused the batch: fail its jobs, rq retries them
                self._fail_batch(fetched.batch, f"engine {self.engine.name} failed: {type(exc).__name__}: {exc}")
                return
        self.inflight.append(SubmittedBatch(fetched.batch, inflight, submitted_at, waits))
        self.metrics.engine_busy(True)

    def _finish(self, submitted: SubmittedBatch) -> None:
        """Wait for a batch's masks and hand them to the writer thread."""
        masks = None
        waiting_since = time.perf_counter()
        try:
            if submitted.inflight is not None:
                masks = submitted.inflight.result()
        except Exception as exc:
            self._fail_batch(submitted.batch, f"engine {self.engine.name} failed: {type(exc).__name__}: {exc}")
            return
        finally:
            if not self.inflight:
                self.metrics.engine_busy(False)
        finished_at = time.perf_counter()
        self.metrics.observe_engine(submitted.submitted_at, finished_at)
        compute_ms = (finished_at - submitted.submitted_at) * 1000
        waits = replace(submitted.waits, engine_wait_ms=(finished_at - waiting_since) * 1000)
        self.writer.put(ComputedBatch(submitted.batch, masks, compute_ms, waits))
        self._handover_s += time.perf_counter() - finished_at

    def _fail_batch(self, batch: FetchedBatch, reason: str) -> None:
        """A batch failed as a whole: fail every open job that had an image in it (rq retries)."""
        self.log.error("batch_failed", reason=reason, batch_size=batch.size)
        failed = self.claims.close_all(claims_of(batch.all_items))
        self.source.fail(failed, reason, retry=True)
        self.metrics.jobs.labels("retried").inc(len(failed))
