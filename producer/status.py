"""Queue status in jobs and in images: queued / started / finished / failed, and the live workers.

Images are engine inputs: a tiled image or stack counts once per tile, and the tiled images held are
counted on their own line.

Images finished counts every image that got its mask: those whose mask still waits in Redis and
those already collected (mask file written, records freed by `producer collect --delete` or
`producer enqueue --out`), so that jobs and images agree however the masks were taken out. Images
failed likewise counts failed images whose by-reference records `producer collect --delete` freed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import redis
from rq import Queue, worker_registration
from rq.job import Job
from rq.utils import utcparse

from broker.payloads import PayloadError
from broker.store import QueueStore
from broker.tiled import TiledImage

# A worker heartbeats its rq record (field `last_heartbeat`) every few seconds (WorkerSettings.
# heartbeat_interval_s, 5 s or less); one silent for three such intervals is dead (SIGKILLed,
# host lost), even though rq keeps its record until the record's TTL of a minute or more runs out.
WORKER_ALIVE_WITHIN_S = 15.0


@dataclass(frozen=True)
class Counts:
    """How many are queued, being worked on, finished and failed."""

    queued: int
    started: int
    finished: int
    failed: int


@dataclass(frozen=True)
class QueueStatus:
    """Job counts come from rq's queue and registries; image counts from the queue's store.

    images.finished = masks_in_redis + collected: images whose mask waits in Redis for `producer
    collect`, plus those already collected into files and freed from Redis.

    Images are counted as the worker sees them, as engine inputs: a tiled image or stack
    (producer/tiling.py) counts once per tile. tiled_images: those still held in Redis, as `tiles` of
    the images counted (their mask file is written once all their tiles are finished).
    """

    queue: str
    jobs: Counts
    images: Counts
    workers: int
    masks_in_redis: int
    collected: int
    tiled_images: int = 0
    tiles: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _images_in(queue: Queue, job_ids: list[str]) -> int:
    """Total images named by these jobs (jobs that vanished count 0)."""
    jobs = Job.fetch_many(job_ids, connection=queue.connection, serializer=queue.serializer)
    return sum(int(job.meta.get("images", 0)) for job in jobs if job is not None)


def live_workers(client: redis.Redis, queue: Queue, within_s: float = WORKER_ALIVE_WITHIN_S) -> int:
    """Workers registered with rq on `queue` whose last heartbeat is at most `within_s` old (Redis's clock)."""
    keys = sorted(worker_registration.get_keys(queue=queue, connection=client))
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for key in keys:
        pipe.hget(key, "last_heartbeat")
    (seconds, micros), *beats = pipe.execute()
    now_s = seconds + micros / 1e6
    return sum(1 for beat in beats if beat is not None and now_s - _timestamp(beat) <= within_s)


def _timestamp(beat: bytes) -> float:
    """Unix seconds of rq's `last_heartbeat` (a UTC time as rq.utils.utcformat writes it); -inf if unreadable."""
    try:
        return utcparse(beat.decode()).timestamp()
    except (UnicodeDecodeError, ValueError):
        return float("-inf")


def queue_status(client: redis.Redis, queue: Queue) -> QueueStatus:
    """A snapshot of the queue. Images "started" are those of started jobs that have no outcome yet.

    Failed jobs are those of rq's failed registry plus those too unreadable for rq to record
    (QueueStore.bad_job_count); workers are those heartbeating (live_workers).
    """
    store = QueueStore(client, queue.name)
    counts = store.counts()
    total_images, done, failed = counts.total, counts.done, counts.failed
    started_job_ids = queue.started_job_registry.get_job_ids()
    started_images = min(_images_in(queue, started_job_ids), max(0, total_images - done - failed))
    jobs = Counts(
        queued=queue.count,
        started=len(started_job_ids),
        finished=queue.finished_job_registry.count,
        failed=queue.failed_job_registry.count + store.bad_job_count(),
    )
    images = Counts(
        queued=max(0, total_images - done - failed - started_images),
        started=started_images,
        finished=done + counts.collected,
        failed=failed + counts.failed_freed,
    )
    tiled_images, tiles = _tiled_counts(store)
    return QueueStatus(queue=queue.name, jobs=jobs, images=images, workers=live_workers(client, queue),
                       masks_in_redis=done, collected=counts.collected, tiled_images=tiled_images, tiles=tiles)


def _tiled_counts(store: QueueStore) -> tuple[int, int]:
    """(tiled images held in Redis, their tiles); a malformed record counts as an image of no known tiles."""
    records = store.tiled_records()
    tiles = 0
    for parent_id, raw in records:
        try:
            tiles += TiledImage.from_json(parent_id, raw).records
        except PayloadError:
            pass  # collect names it as failed
    return len(records), tiles
