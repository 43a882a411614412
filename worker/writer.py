"""The write stage: store masks, record per-image outcomes, complete jobs through the job source, log the batch.

It runs on its own thread, so that the Redis round trips of writing and of the jobs' bookkeeping
overlap the next batches' claiming, fetching and compute. A batch's masks and
failures and every job it completes go to Redis in one call to the job source (one round trip
however many jobs); batches that are already waiting when the writer takes one (it fell behind)
go in the same call, each still logging its own `batch` line: the writer never waits for more.
It works through a bounded queue: when it falls behind, the main loop waits (at most
`put_timeout_s` at a time, in a loop).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import redis
import structlog

from broker.store import QueueStore
from common.tiles import parent_of
from worker.batch import BatchItem, FetchedBatch, MainThreadWaits, claims_of
from worker.claims import OpenClaims
from worker.job_source import Claim, ImageOutcome, JobSource, ResultWrites
from worker.mask_files import MaskFile, write_mask_files
from worker.metrics import WorkerMetrics


def abandon(log: structlog.stdlib.BoundLogger, claims: OpenClaims, items: list[BatchItem], reason: str) -> None:
    """Stop heartbeating these images' jobs (closing their claims), so that rq re-enqueues them after their
    heartbeat TTL; log one `batch_abandoned` line. Called by the thread that holds the batch."""
    log.error("batch_abandoned", reason=reason, batch_size=len(items))
    claims.close_all(claims_of(items))


@dataclass(frozen=True)
class ComputedBatch:
    """A batch whose masks (uint8 (N, H, W), one per `fetched.items`) are ready; masks None if none ran."""

    fetched: FetchedBatch
    masks: np.ndarray | None
    compute_ms: float
    waits: MainThreadWaits = MainThreadWaits()


class ResultWriter:
    """Owns one thread that writes computed batches in order. `close()` drains it and stops it."""

    def __init__(
        self,
        store: QueueStore,
        source: JobSource,
        claims: OpenClaims,
        log: structlog.stdlib.BoundLogger,
        clock,
        depth: int = 4,
        put_timeout_s: float = 1.0,
        metrics: WorkerMetrics | None = None,
        write_masks=write_mask_files,
    ) -> None:
        self.store = store
        self.write_masks = write_masks  # masks of images enqueued by reference: to storage (worker/mask_files.py)
        self.source = source
        self.claims = claims
        self.log = log
        self.clock = clock
        self.put_timeout_s = put_timeout_s
        self.metrics = metrics or WorkerMetrics(clock=clock)
        self.images_done = 0
        self.batches_done = 0
        self._queue: queue.Queue[ComputedBatch | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        self._thread.start()

    def put(self, batch: ComputedBatch) -> None:
        """Hand a computed batch over; waits while the writer is `depth` batches behind."""
        while True:
            try:
                self._queue.put(batch, timeout=self.put_timeout_s)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError("the result writer thread died") from None

    def close(self, timeout_s: float = 300.0) -> None:
        """Write everything handed over, then stop the thread (bounded wait)."""
        if self._thread.is_alive():
            self.put(None)  # type: ignore[arg-type]
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            batches, last = self._waiting([batch])
            try:
                self._write(batches)
            except Exception as exc:  # never let the thread die: leave the jobs to the queue's retry
                abandon(self.log, self.claims, [item for b in batches for item in b.fetched.all_items],
                        f"{type(exc).__name__} while writing results: {exc}")
            if last:
                return

    def _waiting(self, batches: list[ComputedBatch]) -> tuple[list[ComputedBatch], bool]:
        """`batches` and those already handed over behind them (no waiting: only when the writer is behind);
        True if the end of the run (close) was among them."""
        while True:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                return batches, False
            if batch is None:
                return batches, True
            batches.append(batch)

    def _write(self, batches: list[ComputedBatch]) -> None:
        """Write batches that were waiting together: each one's masks and outcomes, then their results and every job
        they complete in one round trip; one `batch` line each (its jobs completed, its own write time)."""
        writes: list[ResultWrites] = []
        completed: list[list[Claim]] = []  # per batch, the jobs whose last outcome it brought
        write_ms: list[float] = []
        for batch in batches:
            start = time.perf_counter()
            writes.append(self._outcomes(batch.fetched, batch.masks))
            earlier = {claim for claims in completed for claim in claims}
            completed.append([claim for claim in self.claims.complete() if claim not in earlier])
            write_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        # closed just before their completion (no longer heartbeated); one the main loop failed meanwhile is skipped
        closed = set(self.claims.close_all([claim for claims in completed for claim in claims]))
        done = [[claim for claim in claims if claim in closed] for claims in completed]
        self._complete(writes, [claim for claims in done for claim in claims])
        shared_ms = (time.perf_counter() - start) * 1000
        for batch, claims, own_ms in zip(batches, done, write_ms, strict=True):
            jobs_failed = sum(1 for claim in claims if not claim.any_ok)
            submitted = batch.fetched
            total_ms = (self.clock() - submitted.taken_at) * 1000  # taken from the batcher until written
            self._log_batch(batch, own_ms + shared_ms, total_ms, len(claims))
            self.metrics.observe_batch(len(submitted.items), len(submitted.rejected), len(claims) - jobs_failed,
                                       jobs_failed, [wait / 1000 for wait in submitted.image_wait_ms],
                                       batch.compute_ms / 1000, total_ms / 1000, fetch_s=submitted.fetch_ms / 1000)

    def _outcomes(self, submitted: FetchedBatch, masks: np.ndarray | None) -> ResultWrites:
        """Write the masks of images enqueued by reference to storage and note each image's outcome on its job;
        the Redis writes of the masks and failures, to go with the jobs' completions."""
        if masks is None and submitted.items:  # masks are None only for a batch with no image to run
            raise RuntimeError(f"no masks for a batch of {len(submitted.items)} images")
        results, files = [], []
        for index, (item, image) in enumerate(zip(submitted.items, submitted.images, strict=True)):
            assert masks is not None
            if image.mask_url is None:
                results.append((item.image_id, masks[index]))
            else:  # enqueued by reference: the mask goes to storage, written before the image is marked done
                files.append(MaskFile.of(image, masks[index]))
        not_written = {file.image_id: reason
                       for file, reason in zip(files, self.write_masks(files), strict=True) if reason is not None}
        failures = [(item.image_id, reason) for item, reason in submitted.rejected] + list(not_written.items())
        written = [file.image_id for file in files if file.image_id not in not_written]

        def write(pipe: redis.client.Pipeline | None) -> None:
            self.store.save_results(results, failures, written=written, pipe=pipe)
        for item, image in zip(submitted.items, submitted.images, strict=True):
            reason = not_written.get(item.image_id)
            outcome = ImageOutcome(item.image_id, ok=reason is None, name=image.name if reason is None else "",
                                   error=reason or "")
            item.claim.outcomes[item.image_id] = outcome
        for item, reason in submitted.rejected:
            item.claim.outcomes[item.image_id] = ImageOutcome(item.image_id, ok=False, error=reason)
        self.images_done += len(submitted.items) - len(not_written)
        return write

    def _complete(self, writes: list[ResultWrites], done: list[Claim]) -> None:
        """Write the batches' results and finish (or, if every image failed, fail) the jobs `done`, in one round
        trip."""
        def results(pipe: redis.client.Pipeline | None) -> None:
            if pipe is None:
                pipe = self.store.client.pipeline(transaction=False)
                for write in writes:
                    write(pipe)
                pipe.execute()
            else:
                for write in writes:
                    write(pipe)
        if done:
            self.source.complete(done, results)
        else:
            results(None)

    def _log_batch(self, batch: ComputedBatch, write_ms: float, total_ms: float, jobs_completed: int) -> None:
        submitted, waits = batch.fetched, batch.waits
        self.batches_done += 1
        job_ids = sorted({claim.job_id for claim in claims_of(submitted.all_items)})
        tile_of = [parent_of(item.image_id) for item in submitted.items]  # per image_wait_ms entry
        self.log.info(
            "batch",
            batch_size=submitted.size,
            images_ok=len(submitted.items),
            images_failed=len(submitted.rejected),
            tiles=sum(1 for item in submitted.all_items if parent_of(item.image_id) is not None),
            tile_of=tile_of if any(tile_of) else None,
            jobs=len(job_ids),
            job_ids=job_ids,
            jobs_completed=jobs_completed,
            queue_wait_ms=max(submitted.image_wait_ms, default=0.0),
            image_wait_ms=submitted.image_wait_ms,
            fetch_ms=round(submitted.fetch_ms, 3),
            compute_ms=round(batch.compute_ms, 3),
            write_ms=round(write_ms, 3),
            total_ms=round(total_ms, 3),
            img_per_s=round(submitted.size / max(total_ms / 1000, 1e-9), 2),
            claim_ms=round(waits.claim_ms, 3),
            handover_ms=round(waits.handover_ms, 3),
            fetch_wait_ms=round(waits.fetch_wait_ms, 3),
            engine_wait_ms=round(waits.engine_wait_ms, 3),
        )
