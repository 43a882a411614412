"""The queue's true backlog, for autoscaling: images producers still have to send, plus queued and claimed ones.

rq's list `rq:queue:<queue>` is a poor scaling signal: `producer enqueue --max-pending N` holds it at
N / job-size jobs however many files are left, and images in claimed jobs are not in it. So each
running `producer enqueue` records how many of its files it has not stored yet, and the backlog adds
those to the images stored and not yet resolved (queued or claimed):

    backlog = to_send (every live producer's files not yet stored)
            + queued  (stored images not in a claimed job: waiting in rq's list, or about to be)
            + claimed (images of jobs in rq's started registry without an outcome yet)

Producers' records live in one hash, `segq:<queue>:producers`, field = producer id, value =
"<files left> <expiry, Redis server time in s>". A producer rewrites its record every few seconds with
an expiry a few periods ahead and deletes it when it ends; a record past its expiry (a producer that
was killed) counts 0 and is removed by the next producer that writes. Every worker exports the
backlog as `segqueue_backlog_images` (worker/observability.py) for a scaler such as KEDA's prometheus
trigger; `producer status` prints it. Server time (TIME) is used throughout, so clocks of producer
and worker hosts need not agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis
from rq.job import Job

from broker.jobs import SERIALIZER, segmentation_queue
from broker.store import QueueStore


def producers_key(queue: str) -> str:
    """The hash of producers' records for `queue`."""
    return f"segq:{queue}:producers"


def _records(client: redis.Redis, queue: str) -> dict[bytes, bytes]:
    """The producers' hash (clients from broker.connection do not decode replies: bytes)."""
    return cast(dict[bytes, bytes], client.hgetall(producers_key(queue)))


def _server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def record_to_send(client: redis.Redis, queue: str, producer_id: str, files_left: int, ttl_s: float) -> None:
    """Record that `producer_id` has `files_left` files not yet stored, valid for ttl_s seconds; drop expired
    records of others."""
    now = _server_time(client)
    expired = [field for field, value in _records(client, queue).items()
               if _parse(value)[1] < now and field.decode() != producer_id]
    pipe = client.pipeline(transaction=False)
    pipe.hset(producers_key(queue), producer_id, f"{max(0, files_left)} {now + ttl_s:.3f}")
    if expired:
        pipe.hdel(producers_key(queue), *expired)
    pipe.execute()


def forget_producer(client: redis.Redis, queue: str, producer_id: str) -> None:
    """The producer ended: its record goes."""
    client.hdel(producers_key(queue), producer_id)


def _parse(value: bytes) -> tuple[int, float]:
    """(files left, expiry) of a record; an unreadable record counts 0 and is expired."""
    try:
        left, expires = value.split()
        return int(left), float(expires)
    except ValueError:
        return 0, float("-inf")


@dataclass(frozen=True)
class Backlog:
    """Images still to be processed on one queue, by where they are."""

    to_send: int
    queued: int
    claimed: int
    producers: int  # live producers (records not expired)

    @property
    def total(self) -> int:
        return self.to_send + self.queued + self.claimed


def read_backlog(client: redis.Redis, queue: str) -> Backlog:
    """The backlog now: a few round trips (producers' hash, image counts, started jobs' image counts)."""
    now = _server_time(client)
    records = [_parse(value) for value in _records(client, queue).values()]
    live = [left for left, expires in records if expires >= now]
    counts = QueueStore(client, queue).counts()
    unresolved = max(0, counts.total - counts.done - counts.failed)
    started = segmentation_queue(client, queue).started_job_registry.get_job_ids()
    jobs = Job.fetch_many(started, connection=client, serializer=SERIALIZER) if started else []  # JSON: no pickle
    claimed = min(unresolved, sum(int(job.meta.get("images", 0)) for job in jobs if job is not None))
    return Backlog(to_send=sum(live), queued=unresolved - claimed, claimed=claimed, producers=len(live))
