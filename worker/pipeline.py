"""The worker's main loop: claim jobs -> batch images across jobs -> fetch -> engine -> write masks -> complete jobs.

Up to `engine.slots` batches are in flight: while the engine computes batch k, the loop fetches and
submits batch k+1 and writes batch k-1, so Redis I/O overlaps compute. One image's problem (missing,
malformed, wrong size) fails that image alone; an engine or Redis error fails the jobs of that batch,
which rq then retries (`Retry`). Every batch logs one `batch` line.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis
import structlog

from broker.store import QueueKeys, StoredImage, load_images, now, save_failure, save_mask
from engines.base import Engine, InFlight
from worker.batcher import Batcher
from worker.rq_jobs import BatchingRqWorker, ClaimedJob
from worker.settings import WorkerSettings

MAX_REDIS_BACKOFF_S = 10.0


@dataclass(frozen=True)
class BatchItem:
    """One image of a claimed job, waiting in the batcher."""

    claim: ClaimedJob
    image_id: str


@dataclass
class SubmittedBatch:
    """A batch handed to the engine: `items[i]` is `images[i]`; `rejected` failed before the engine."""

    items: list[BatchItem]
    images: list[StoredImage]
    rejected: list[tuple[BatchItem, str]]
    inflight: InFlight | None
    taken_at: float
    fetch_ms: float
    image_wait_ms: list[float]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def all_items(self) -> list[BatchItem]:
        return self.items + [item for item, _ in self.rejected]

    @property
    def size(self) -> int:
        return len(self.items) + len(self.rejected)


class BatchPipeline:
    """Runs one worker until its queue is drained (`burst`) or it is asked to stop; owns nothing it didn't get."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        rq_worker: BatchingRqWorker,
        client: redis.Redis,
        log: structlog.stdlib.BoundLogger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.rq = rq_worker
        self.client = client
        self.keys = QueueKeys(settings.broker.queue)
        self.log = log
        self.clock = clock
        self.batcher: Batcher[BatchItem] = Batcher(settings.max_batch, settings.max_wait_s, clock)
        self.inflight: deque[SubmittedBatch] = deque()
        self.claims: list[ClaimedJob] = []
        self.images_done = 0
        self.batches_done = 0
        self._last_keepalive = clock()

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Process jobs until done; returns the number of images that got a mask."""
        started = self.clock()
        backoff_s = 0.5
        while True:
            try:
                if not self._step():
                    break
                backoff_s = 0.5
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting or unreachable: keep the claimed work, retry with a bounded backoff.
                self.log.warning("redis_unavailable", error=str(exc), retry_in_s=backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_REDIS_BACKOFF_S)
        elapsed = self.clock() - started
        self.log.info("worker_drained", images=self.images_done, batches=self.batches_done, seconds=round(elapsed, 3))
        return self.images_done

    def _step(self) -> bool:
        """One pass of the loop: finish, claim, submit or wait. False when the worker should stop."""
        self._keep_alive_if_due()
        if len(self.inflight) >= self.engine.slots:
            self._finish(self.inflight.popleft())
            return True
        if not self.rq.stop_requested:
            self._claim_available()
        if self.batcher.ready() or (self.rq.stop_requested and len(self.batcher)):
            self._submit()
            return True
        if self.inflight:
            self._finish(self.inflight.popleft())
            return True
        if self.rq.stop_requested:
            return False
        return self._wait_for_work()

    def _keep_alive_if_due(self) -> None:
        """Heartbeat the worker and its open jobs, and run rq maintenance, every heartbeat interval."""
        if self.clock() - self._last_keepalive < self.settings.heartbeat_interval_s:
            return
        self._last_keepalive = self.clock()
        self.rq.keep_alive(self.claims)
        self.rq.maintain()

    def _claim_available(self) -> None:
        """Claim queued jobs without blocking until a full batch of images waits."""
        while len(self.batcher) < self.settings.max_batch:
            claim = self.rq.claim(timeout_s=None)
            if claim is None:
                return
            self._accept(claim)

    def _wait_for_work(self) -> bool:
        """Nothing to compute: block for the next job (bounded). False means: stop (burst, queue empty)."""
        if len(self.batcher):
            timeout = self.batcher.time_left()
        elif self.settings.burst:
            timeout = None
        else:
            timeout = self.settings.idle_poll_s
        claim = self.rq.claim(timeout_s=None if timeout is None else min(timeout, self.settings.idle_poll_s))
        if claim is not None:
            self._accept(claim)
            return True
        if not len(self.batcher):
            self.rq.maintain()
            return not self.settings.burst
        return True

    def _accept(self, claim: ClaimedJob) -> None:
        self.claims.append(claim)
        for image_id in claim.image_ids:
            self.batcher.add(BatchItem(claim, image_id))

    # --- one batch -------------------------------------------------------------------------

    def _submit(self) -> None:
        """Take a batch, fetch its pixels, reject unusable images, and hand the rest to the engine."""
        items = self.batcher.take()
        taken_at = self.clock()
        fetch_start = time.perf_counter()
        try:
            loaded = load_images(self.client, self.keys, [item.image_id for item in items])
        except redis.RedisError as exc:
            self._abandon(items, f"redis error while fetching images: {exc}")
            raise
        good_items, images, rejected = [], [], []
        spec = self.engine.spec
        for item, image in zip(items, loaded):
            if isinstance(image, str):
                rejected.append((item, image))
            elif image.pixels.shape != (spec.height, spec.width):
                h, w = image.pixels.shape
                rejected.append((item, f"image {image.name} is stored at {h}x{w} but the engine expects "
                                       f"{spec.height}x{spec.width}: enqueue it again with --size {spec.height}"))
            else:
                good_items.append(item)
                images.append(image)
        batch = np.stack([image.pixels for image in images]) if images else None
        fetch_ms = (time.perf_counter() - fetch_start) * 1000
        taken_wall = now()
        submitted = SubmittedBatch(
            items=good_items,
            images=images,
            rejected=rejected,
            inflight=None,
            taken_at=taken_at,
            fetch_ms=fetch_ms,
            image_wait_ms=[round(max(0.0, taken_wall - image.enqueued_at) * 1000, 1) for image in images],
        )
        submitted.timings["submitted"] = time.perf_counter()
        if batch is not None:
            try:
                submitted.inflight = self.engine.submit(batch)
            except Exception as exc:  # the engine refused the batch: fail its jobs, rq retries them
                self._fail_batch(submitted, f"engine {self.engine.name} failed: {type(exc).__name__}: {exc}")
                return
        self.inflight.append(submitted)

    def _finish(self, submitted: SubmittedBatch) -> None:
        """Wait for a batch's masks, write them, record per-image outcomes, complete finished jobs."""
        masks = None
        if submitted.inflight is not None:
            try:
                masks = submitted.inflight.result()
            except Exception as exc:
                self._fail_batch(submitted, f"engine {self.engine.name} failed: {type(exc).__name__}: {exc}")
                return
        compute_ms = (time.perf_counter() - submitted.timings["submitted"]) * 1000
        write_start = time.perf_counter()
        try:
            self._write(submitted, masks)
            jobs_completed = self._complete_finished_jobs()
        except redis.RedisError as exc:
            self._abandon(submitted.all_items, f"redis error while writing results: {exc}")
            return
        write_ms = (time.perf_counter() - write_start) * 1000
        self._log_batch(submitted, compute_ms, write_ms, jobs_completed)

    def _write(self, submitted: SubmittedBatch, masks: np.ndarray | None) -> None:
        """Store masks and failures in one round trip, and note each image's outcome on its job."""
        pipe = self.client.pipeline(transaction=False)
        for index, (item, image) in enumerate(zip(submitted.items, submitted.images)):
            save_mask(pipe, self.keys, item.image_id, masks[index])
        for item, reason in submitted.rejected:
            save_failure(pipe, self.keys, item.image_id, reason)
        pipe.execute()
        for item, image in zip(submitted.items, submitted.images):
            item.claim.outcomes[item.image_id] = {"image": item.image_id, "name": image.name, "ok": True}
        for item, reason in submitted.rejected:
            item.claim.outcomes[item.image_id] = {"image": item.image_id, "ok": False, "error": reason}
        self.images_done += len(submitted.items)

    def _complete_finished_jobs(self) -> int:
        """Finish (or, if every image failed, fail) each job whose images all have an outcome."""
        completed = 0
        for claim in [c for c in self.claims if c.complete and not c.closed]:
            if any(outcome["ok"] for outcome in claim.outcomes.values()):
                self.rq.finish(claim)
            else:
                reasons = "; ".join(sorted({o["error"] for o in claim.outcomes.values()}))
                self.rq.fail(claim, f"every image of this job failed: {reasons}", retry=False)
            completed += 1
        self.claims = [c for c in self.claims if not c.closed]
        return completed

    def _fail_batch(self, submitted: SubmittedBatch, reason: str) -> None:
        """A batch failed as a whole: fail every open job that had an image in it (rq retries)."""
        self.log.error("batch_failed", reason=reason, batch_size=submitted.size)
        for claim in self._claims_of(submitted.all_items):
            if not claim.closed:
                self.rq.fail(claim, reason, retry=True)
        self.claims = [c for c in self.claims if not c.closed]

    def _abandon(self, items: list[BatchItem], reason: str) -> None:
        """Redis failed mid-batch: stop heartbeating these images' jobs so that rq re-enqueues them."""
        self.log.error("batch_abandoned", reason=reason, batch_size=len(items))
        abandoned = self._claims_of(items)
        for claim in abandoned:
            claim.closed = True
        self.claims = [c for c in self.claims if c not in abandoned]

    @staticmethod
    def _claims_of(items: list[BatchItem]) -> list[ClaimedJob]:
        """The distinct jobs these items belong to, in first-seen order."""
        claims: list[ClaimedJob] = []
        for item in items:
            if item.claim not in claims:
                claims.append(item.claim)
        return claims

    def _log_batch(self, submitted: SubmittedBatch, compute_ms: float, write_ms: float, jobs_completed: int) -> None:
        total_ms = (self.clock() - submitted.taken_at) * 1000
        self.batches_done += 1
        job_ids = sorted({claim.job.id for claim in self._claims_of(submitted.all_items)})
        self.log.info(
            "batch",
            batch_size=submitted.size,
            images_ok=len(submitted.items),
            images_failed=len(submitted.rejected),
            jobs=len(job_ids),
            job_ids=job_ids,
            jobs_completed=jobs_completed,
            queue_wait_ms=max(submitted.image_wait_ms, default=0.0),
            image_wait_ms=submitted.image_wait_ms,
            fetch_ms=round(submitted.fetch_ms, 3),
            compute_ms=round(compute_ms, 3),
            write_ms=round(write_ms, 3),
            total_ms=round(total_ms, 3),
            img_per_s=round(submitted.size / max(total_ms / 1000, 1e-9), 2),
        )
