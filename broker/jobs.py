"""The rq job format of a segmentation queue, owned by one module: what a job is, and how it is read back.

A segmentation job is an ordinary rq job, serialized with rq's JSON serializer (nothing read from
Redis is ever unpickled), on the queue `segmentation_queue` builds. It names the function
`JOB_FUNC` (worker/jobs.py, never called by `worker run`) with one argument, the list of its image
ids (`job_arguments` / `parse_job_arguments`); its meta names them again (`job_meta`), so that the
images of a job whose data turns out unreadable can still be failed with it (`image_ids_in_meta`).
Images travel by reference, never inside job arguments; writing a mask twice overwrites it, so
processing is idempotent.

Enqueue options (`job_data`): `Retry(JOB_RETRIES, enqueue_at_front=True)`, so a job whose worker died
(or whose batch failed) is taken up again before the jobs queued behind it; rq's own timeout
(`JOB_TIMEOUT_S`; the worker's heartbeat TTL is what detects dead workers); how long a finished or
failed job's record stays (`RESULT_TTL_S`, `FAILURE_TTL_S`).

The producer (producer/enqueue.py), the worker's rq adapter (worker/rq_source.py) and the diagnosis of
unreadable jobs (worker/unreadable.py) use this module; none of them spells the format out again.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, str_to_date

from broker.errors import BadJob

JOB_FUNC = "worker.jobs.segment_images"
SERIALIZER = JSONSerializer
JOB_RETRIES = 10  # a retried job goes back to the front of the queue, so repeated worker kills (a soak kills
# every few seconds) hit the same jobs again: 3 retries let one job be failed after four kills in a soak run
JOB_TIMEOUT_S = 3600  # rq's own limit on one job; the worker's heartbeat TTL is what detects dead workers
RESULT_TTL_S = 7 * 24 * 3600
FAILURE_TTL_S = 30 * 24 * 3600


def segmentation_queue(client: redis.Redis, name: str) -> Queue:
    """The rq queue of this project (JSON serializer: nothing read from Redis is unpickled)."""
    return Queue(name, connection=client, serializer=SERIALIZER)


def job_arguments(image_ids: Sequence[str]) -> list[Any]:
    """The positional arguments of a segmentation job (JSON-serializable)."""
    return [list(image_ids)]


def job_meta(image_ids: Sequence[str]) -> dict[str, Any]:
    """A segmentation job's rq meta: its number of images, and their ids again, so that the images of a
    job whose data cannot be read (not JSON, a pickle) can still be failed with it."""
    return {"images": len(image_ids), "image_ids": list(image_ids)}


def job_data(image_ids: Sequence[str], description: str) -> Any:
    """rq's EnqueueData for one segmentation job of these images, with this project's enqueue options
    (for `Queue.enqueue_many`)."""
    return Queue.prepare_data(
        JOB_FUNC,
        args=job_arguments(image_ids),
        timeout=JOB_TIMEOUT_S,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        retry=Retry(max=JOB_RETRIES, enqueue_at_front=True),
        description=description,
        meta=job_meta(image_ids),
    )


def parse_job_arguments(args: Any) -> list[str]:
    """Image ids from a job's arguments; BadJob if they are not what `job_arguments` writes."""
    if (
        not isinstance(args, (list, tuple))
        or len(args) != 1
        or not isinstance(args[0], list)
        or not args[0]
        or not all(isinstance(i, str) and i for i in args[0])
    ):
        raise BadJob(f"job arguments must be [[image_id, ...]] with at least one id, got {args!r:.200}")
    return list(args[0])


def image_ids_in_meta(meta: Any) -> list[str]:
    """The image ids `job_meta` wrote into a job's meta, or [] if it holds none (older jobs, damaged meta)."""
    if not isinstance(meta, dict):
        return []
    try:
        return parse_job_arguments([meta.get("image_ids")])
    except BadJob:
        return []


def arguments_in_data(data: bytes) -> Any:
    """The positional arguments in a job hash's raw `data` field (rq's serialized [function, instance,
    args, kwargs], zlib-compressed or not, as rq reads it). Raises whatever the bytes make fail."""
    try:
        data = zlib.decompress(data)
    except zlib.error:
        pass  # rq falls back on uncompressed data the same way
    _func, _instance, args, _kwargs = SERIALIZER.loads(data)
    return args


def load_meta(raw: bytes) -> Any:
    """A job hash's raw `meta` field, decoded with the job serializer. Raises whatever the bytes make fail."""
    return SERIALIZER.loads(raw)


def is_job_date(text: str) -> bool:
    """Whether rq can read `text` as one of its job dates (created_at, enqueued_at, ...)."""
    try:
        str_to_date(text)
    except ValueError:
        return False
    return True


def working_seconds(job: Job) -> float:
    """Seconds from a job's start (set when claimed) to its end (set when recorded); 0 if either is unset."""
    if job.started_at is None or job.ended_at is None:
        return 0.0
    return (job.ended_at - job.started_at).total_seconds()


def registry_score(ttl: int) -> float | str:
    """A registry entry's expiry score for a TTL in seconds, as rq's BaseRegistry.add computes it (-1: never)."""
    return "+inf" if ttl == -1 else ttl if ttl < 0 else current_timestamp() + ttl
