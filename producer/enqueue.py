"""Enqueue stage: validate and decode image files, store each under its own key, enqueue rq jobs of several images.

Files are decoded and stored in chunks by the producer pool (producer/pool.py: `workers` processes,
each with its own Redis connection); this process then enqueues the jobs naming the stored images,
many jobs per round trip. Images are written before the job that names them, so a worker never sees
a job whose images are not there yet. The job format and enqueue options (JSON serializer, `Retry` at the
front of the queue, TTLs) are broker/jobs.py's. A bad file is
reported (file and problem) and skipped; the good ones are still enqueued. With `max_pending`, storing
waits while that many of this run's records (engine inputs: images and tiles) are held in Redis
(producer/stream.py), so memory stays bounded however large the input; each file's record count is read
from its headers before it is stored (producer/tiling.py). Files are stored in chunks of at most
CHUNK_FILES files and, with `max_pending`, at most max_pending records (a file larger than that is
stored alone, once nothing else is pending).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rq import Queue

from broker.errors import SegqueueError
from broker.jobs import job_data
from broker.store import QueueStore, StoredImage
from common.images import ImageError, ImageSource, find_images
from producer.pool import ProducerPool, StoredChunk, StoredUnit
from producer.stream import PendingImages
from producer.tiling import TILE, Fitting, file_records

CHUNK_FILES = 16  # files per store task: one Redis round trip each


class PendingTimeout(SegqueueError):
    """--max-pending: Redis stayed full (nothing collected) for longer than the timeout."""


@dataclass
class EnqueueReport:
    """What an enqueue run did: ids of stored records (images and tiles) and jobs, files stored (`units`:
    an image, or a tiled image or stack) and every rejected file with its reason."""

    image_ids: list[str] = field(default_factory=list)
    units: list[StoredUnit] = field(default_factory=list)
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
        self.report.units.append(StoredUnit(image.image_id, image.name, 1, tiled=False))
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
    def records(self) -> int:
        """Records (engine inputs, as counted when submitted) in the tasks not yet settled."""
        return sum(records for records, _ in self._tasks)

    def add(self, records: int, task: Future) -> None:
        self._tasks.append((records, task))

    def settle_oldest(self) -> None:
        """Wait for the oldest task; enqueue the full jobs of its images (they are stored now)."""
        _, task = self._tasks.popleft()
        chunk: StoredChunk = task.result()
        for problem in chunk.rejected:
            self.enqueuer.report.rejected.append(problem)
            self.on_progress(1, problem)
        self.enqueuer.add_ids(chunk.stored)
        self.enqueuer.enqueue_full_jobs()
        self.enqueuer.report.units.extend(chunk.units)
        if self.pending is not None:
            self.pending.add(chunk.units)
        self.on_progress(len(chunk.units), None)

    def settle_all(self) -> None:
        while self._tasks:
            self.settle_oldest()


def _make_room(window: _StoreWindow, pending: PendingImages, records: int, max_pending: int, timeout_s: float,
               stop: threading.Event) -> None:
    """Block until `records` more records fit under max_pending (counting those being stored); PendingTimeout if
    not in time.

    Returns early once `stop` is set."""
    while len(window) and len(pending) + window.records + records > max_pending:
        window.settle_oldest()
    if len(pending) + records > max_pending:  # about to wait: the records kept for a fuller job must be queued
        window.enqueuer.flush()
    if not pending.wait_below(max(1, max_pending - records + 1), time.monotonic() + timeout_s) and not stop.is_set():
        raise PendingTimeout(f"{len(pending)} records (images and tiles) still pending in Redis after "
                             f"{timeout_s:.0f} s (--max-pending {max_pending}): are workers running, and is anyone "
                             "collecting?")


def _chunks(sources: list[ImageSource], height: int, width: int, fitting: Fitting,
            max_records: int | None) -> Iterator[tuple[list[ImageSource], int]]:
    """Sources in store chunks of at most CHUNK_FILES files, with their record count; with max_records, a chunk
    also holds at most that many records (read from the files' headers), or one file if it alone is larger."""
    chunk: list[ImageSource] = []
    records = 0
    for source in sources:
        weight = 1 if max_records is None else file_records(source.path, height, width, fitting)
        if chunk and (len(chunk) >= CHUNK_FILES or (max_records is not None and records + weight > max_records)):
            yield chunk, records
            chunk, records = [], 0
        chunk.append(source)
        records += weight
    if chunk:
        yield chunk, records


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
    fitting: Fitting = TILE,
) -> EnqueueReport:
    """Decode every image under `paths` for a height x width engine and enqueue them; bad files are reported, not
    fatal. `fitting`: how a file that is not one page of that size is stored (tiles by default; producer/tiling.py).

    pool: where files are decoded and stored (default: this process). pending: this run's records
    held in Redis; with max_pending (which needs pending), no chunk is stored while max_pending
    records are pending (PendingTimeout if none leaves for pending_timeout_s). `on_progress(files,
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
    fitting = fitting.for_engine(height, width)
    window = _StoreWindow(enqueuer, pending, on_progress)
    chunk_records = CHUNK_FILES if max_pending is None else max(1, min(CHUNK_FILES, max_pending))
    ahead_records = 2 * pool.workers * chunk_records  # stored ahead of the jobs, at most (and one chunk)
    try:
        for chunk, records in _chunks(sources, height, width, fitting, chunk_records if max_pending else None):
            if pending is not None:
                pending.look()
            if max_pending is not None and pending is not None:
                _make_room(window, pending, records, max_pending, pending_timeout_s, stop)
            if stop.is_set():
                enqueuer.report.interrupted = True
                break
            window.add(records, pool.submit_store(chunk, height, width, fitting))
            while window.records > ahead_records:
                window.settle_oldest()
    finally:  # images already stored get their jobs, even when the run stops early
        try:
            window.settle_all()
        finally:
            enqueuer.flush()
            if own_pool:
                pool.close()
    return enqueuer.report
