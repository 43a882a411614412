"""Queue status in jobs and in images: queued / started / finished / failed."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import redis
from rq import Queue
from rq.job import Job
from rq.worker import Worker

from broker.store import QueueStore


@dataclass(frozen=True)
class Counts:
    """How many are queued, being worked on, finished and failed."""

    queued: int
    started: int
    finished: int
    failed: int


@dataclass(frozen=True)
class QueueStatus:
    """Job counts come from rq's queue and registries; image counts from the queue's done/failed keys."""

    queue: str
    jobs: Counts
    images: Counts
    workers: int

    def as_dict(self) -> dict:
        return asdict(self)


def _images_in(queue: Queue, job_ids: list[str]) -> int:
    """Total images named by these jobs (jobs that vanished count 0)."""
    jobs = Job.fetch_many(job_ids, connection=queue.connection, serializer=queue.serializer)
    return sum(int(job.meta.get("images", 0)) for job in jobs if job is not None)


def queue_status(client: redis.Redis, queue: Queue) -> QueueStatus:
    """A snapshot of the queue. Images "started" are those of started jobs that have no outcome yet."""
    counts = QueueStore(client, queue.name).counts()
    total_images, done, failed = counts.total, counts.done, counts.failed
    started_job_ids = queue.started_job_registry.get_job_ids()
    started_images = min(_images_in(queue, started_job_ids), max(0, total_images - done - failed))
    jobs = Counts(
        queued=queue.count,
        started=len(started_job_ids),
        finished=queue.finished_job_registry.count,
        failed=queue.failed_job_registry.count,
    )
    images = Counts(
        queued=max(0, total_images - done - failed - started_images),
        started=started_images,
        finished=done,
        failed=failed,
    )
    return QueueStatus(queue=queue.name, jobs=jobs, images=images, workers=Worker.count(queue=queue))
