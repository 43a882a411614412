"""Enqueue stage: validate and decode image files, store each under its own key, enqueue rq jobs of several images.

Images are written before the job that names them, so a worker never sees a job whose images are
not there yet. Jobs are JSON-serialized and carry `Retry`, so a job whose worker died is taken up
again. A bad file is reported (file and problem) and skipped; the good ones are still enqueued.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from broker.store import JOB_FUNC, QueueStore, StoredImage, new_image_id, now
from common.images import DecodedImage, ImageError, ImageSource, decode_image, find_images

JOB_RETRIES = 3
JOB_TIMEOUT_S = 3600  # rq's own limit on one job; the worker's heartbeat TTL is what detects dead workers
RESULT_TTL_S = 7 * 24 * 3600
FAILURE_TTL_S = 30 * 24 * 3600


@dataclass
class EnqueueReport:
    """What an enqueue run did: ids of stored images and jobs, and every rejected file with its reason."""

    image_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    rejected: list[ImageError] = field(default_factory=list)


def segmentation_queue(client: redis.Redis, name: str) -> Queue:
    """The rq queue of this project (JSON serializer: nothing read from Redis is unpickled)."""
    return Queue(name, connection=client, serializer=JSONSerializer)


class Enqueuer:
    """Stores decoded images and enqueues a job every `job_size` images."""

    def __init__(self, client: redis.Redis, queue: Queue, job_size: int) -> None:
        if job_size < 1:
            raise ValueError(f"job size must be >= 1, got {job_size}")
        self.client = client
        self.queue = queue
        self.store = QueueStore(client, queue.name)
        self.job_size = job_size
        self.report = EnqueueReport()
        self._pending: list[StoredImage] = []

    def add(self, source: ImageSource, decoded: DecodedImage) -> None:
        """Keep one decoded image; a job is enqueued once `job_size` images are kept."""
        self.add_stored(
            StoredImage(
                image_id=new_image_id(),
                name=source.name,
                pixels=decoded.pixels,
                original_height=decoded.original_height,
                original_width=decoded.original_width,
                enqueued_at=now(),
            )
        )

    def add_stored(self, image: StoredImage) -> None:
        """Keep one image already at the engine's size; enqueue a job once `job_size` are kept."""
        self._pending.append(image)
        if len(self._pending) >= self.job_size:
            self.flush()

    def flush(self) -> None:
        """Store the kept images, then enqueue one job naming them."""
        if not self._pending:
            return
        images, self._pending = self._pending, []
        self.store.store_images(images)
        ids = [image.image_id for image in images]
        job = self.queue.enqueue_call(
            JOB_FUNC,
            args=QueueStore.job_arguments(ids),
            timeout=JOB_TIMEOUT_S,
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            retry=Retry(max=JOB_RETRIES),
            description=f"segment {len(ids)} images: {images[0].name} ...",
            meta={"images": len(ids)},
        )
        self.report.image_ids.extend(ids)
        self.report.job_ids.append(job.id)


def enqueue_paths(
    enqueuer: Enqueuer,
    paths: Iterable[Path],
    height: int,
    width: int,
    on_progress: Callable[[ImageSource | None, ImageError | None], None] = lambda source, error: None,
) -> EnqueueReport:
    """Decode every image under `paths` at height x width and enqueue them; bad files are reported, not fatal.

    `on_progress(source, error)` is called once per file (error set if it was rejected) and once per
    path that could not be expanded (source None).
    """
    sources, problems = find_images(list(paths))
    for problem in problems:
        enqueuer.report.rejected.append(problem)
        on_progress(None, problem)
    for source in sources:
        try:
            decoded = decode_image(source.path, height, width)
        except ImageError as problem:
            enqueuer.report.rejected.append(problem)
            on_progress(source, problem)
            continue
        enqueuer.add(source, decoded)
        on_progress(source, None)
    enqueuer.flush()
    return enqueuer.report
