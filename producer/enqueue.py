"""Enqueue stage: validate and decode image files, store each under its own key, enqueue rq jobs of several images.

Files are decoded and stored in chunks by the producer pool (producer/pool.py: `workers` processes,
each with its own Redis connection); this process then enqueues the jobs naming the stored images,
many jobs per round trip. Images are written before the job that names them, so a worker never sees
a job whose images are not there yet. The job format and enqueue options (JSON serializer, `Retry` at the
front of the queue, TTLs) are broker/jobs.py's. A bad file is
reported (file and problem) and skipped; the good ones are still enqueued. With `max_pending`, storing
waits while that many of this run's images are held in Redis (producer/stream.py), so memory stays
bounded however large the input.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rq import Queue

from broker.errors import SegqueueError
from broker.jobs import job_data
from broker.store import QueueStore, StoredImage
from common.images import ImageError, find_images
from producer.pool import ProducerPool, StoredChunk
from producer.stream import PendingImages

CHUNK_FILES = 16  # files per store task: one Redis round trip each


class PendingTimeout(SegqueueError):
    """--max-pending: Redis stayed full (nothing collected) for longer than the timeout."""


@dataclass
class EnqueueReport:
    """What an enqueue run did: ids of stored images and jobs, and every rejected file with its reason."""

    image_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    rejected: list[ImageError] = field(default_factory=list)
    interrupted: bool = False  # stopped early (Ctrl-C): files after the last chunk stored were not read


class Enqueuer:
    """Enqueues a job every `job_size` stored images, writing many jobs per round trip."""

    def __init__(self, client: redis.Redis, queue: Queue, job_size: int) -> None:
        if job_size < 1:
            raise ValueError(f"job size must be >= 1, got {job_size}")
        self.client = client
        self.queue = queue
        self.store = QueueStore(client, queue.name)
        self.job_size = job_size
        self.report = EnqueueReport()
        self._images: list[tuple[str, str]] = []

    def add_stored(self, image: StoredImage) -> None:
        """Store one image already at the engine's size, and keep it for the next job (benchmarks, tests)."""
        self.store.store_images([image])
        self.add_ids([(image.image_id, image.name)])
        self.enqueue_full_jobs()

    def add_ids(self, stored: Sequence[tuple[str, str]]) -> None:
        """Images already stored, (image_id, name) pairs; they go into jobs at the next enqueue."""
        self._images.extend(stored)

    def enqueue_full_jobs(self) -> None:
        """Enqueue every full job of kept images, in one round trip."""
        self._enqueue(len(self._images) - len(self._images) % self.job_size)

    def flush(self) -> None:
        """Enqueue every kept image, the last job possibly short."""
        self._enqueue(len(self._images))

    def _enqueue(self, count: int) -> None:
        if count <= 0:
            return
        taken, self._images = self._images[:count], self._images[count:]
        datas = []
        for start in range(0, count, self.job_size):
            job = taken[start:start + self.job_size]
            datas.append(job_data([image_id for image_id, _ in job], f"segment {len(job)} images: {job[0][1]} ..."))
        with self.client.pipeline() as pipe:
            jobs = self.queue.enqueue_many(datas, pipeline=pipe)
            pipe.execute()
        self.report.image_ids.extend(image_id for image_id, _ in taken)
        self.report.job_ids.extend(job.id for job in jobs)


ProgressCallback = Callable[[int, "ImageError | None"], None]


class _StoreWindow:
    """Store tasks in flight, oldest first. Settling one enqueues jobs for its images and reports its rejections."""

    def __init__(self, enqueuer: Enqueuer, pending: PendingImages | None, on_progress: ProgressCallback) -> None:
        self.enqueuer = enqueuer
        self.pending = pending
        self.on_progress = on_progress
        self._tasks: deque[tuple[int, Future]] = deque()

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def files(self) -> int:
        """Files in the tasks not yet settled."""
        return sum(files for files, _ in self._tasks)

    def add(self, files: int, task: Future) -> None:
        self._tasks.append((files, task))

    def settle_oldest(self) -> None:
        """Wait for the oldest task; enqueue the full jobs of its images (they are stored now)."""
        _, task = self._tasks.popleft()
        chunk: StoredChunk = task.result()
        for problem in chunk.rejected:
            self.enqueuer.report.rejected.append(problem)
            self.on_progress(1, problem)
        self.enqueuer.add_ids(chunk.stored)
        self.enqueuer.enqueue_full_jobs()
        if self.pending is not None:
            self.pending.add(chunk.stored)
        self.on_progress(len(chunk.stored), None)

    def settle_all(self) -> None:
        while self._tasks:
            self.settle_oldest()


def _make_room(window: _StoreWindow, pending: PendingImages, files: int, max_pending: int, timeout_s: float,
               stop: threading.Event) -> None:
    """Block until `files` more images fit under max_pending (counting those being stored); PendingTimeout if not in
    time.

    Returns early once `stop` is set."""
    while len(window) and len(pending) + window.files + files > max_pending:
        window.settle_oldest()
    if not pending.wait_below(max(1, max_pending - files + 1), time.monotonic() + timeout_s) and not stop.is_set():
        raise PendingTimeout(f"{len(pending)} images still pending in Redis after {timeout_s:.0f} s "
                             f"(--max-pending {max_pending}): are workers running, and is anyone collecting?")


def enqueue_paths(
    enqueuer: Enqueuer,
    paths: Iterable[Path],
    height: int,
    width: int,
    on_progress: ProgressCallback = lambda files, error: None,
    pool: ProducerPool | None = None,
    pending: PendingImages | None = None,
    max_pending: int | None = None,
    pending_timeout_s: float = 3600.0,
    on_found: Callable[[int], None] = lambda files: None,
    stop: threading.Event | None = None,
) -> EnqueueReport:
    """Decode every image under `paths` at height x width and enqueue them; bad files are reported, not fatal.

    pool: where files are decoded and stored (default: this process). pending: this run's images
    held in Redis; with max_pending (which needs pending), no chunk is stored while max_pending
    images are pending (PendingTimeout if none leaves for pending_timeout_s). `on_progress(files,
    error)` is called with the number of files handled (0 for a path that could not be expanded)
    and the rejection, if any. `on_found(files)` is called once, with the number of image files
    found, before any is decoded. Once `stop` is set (Ctrl-C), no further chunk is started: the
    chunks in flight are stored and get their jobs, and the report says `interrupted`.
    """
    if max_pending is not None and pending is None:
        raise ValueError("max_pending needs a PendingImages to watch")
    stop = stop or threading.Event()
    sources, problems = find_images(list(paths))
    on_found(len(sources))
    for problem in problems:
        enqueuer.report.rejected.append(problem)
        on_progress(0, problem)
    own_pool = pool is None
    pool = pool or ProducerPool(None, enqueuer.store, workers=1)
    chunk_files = CHUNK_FILES if max_pending is None else max(1, min(CHUNK_FILES, max_pending))
    window = _StoreWindow(enqueuer, pending, on_progress)
    ahead_files = 2 * pool.workers * chunk_files  # decoded ahead of the jobs, at most
    try:
        for start in range(0, len(sources), chunk_files):
            chunk = sources[start:start + chunk_files]
            if pending is not None:
                pending.look()
            if max_pending is not None and pending is not None:
                _make_room(window, pending, len(chunk), max_pending, pending_timeout_s, stop)
            if stop.is_set():
                enqueuer.report.interrupted = True
                break
            window.add(len(chunk), pool.submit_store(chunk, height, width))
            while window.files > ahead_files:
                window.settle_oldest()
    finally:  # images already stored get their jobs, even when the run stops early
        try:
            window.settle_all()
        finally:
            enqueuer.flush()
            if own_pool:
                pool.close()
    return enqueuer.report
