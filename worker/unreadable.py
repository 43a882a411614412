"""Why a claimed job cannot be used: reasons that say what is wrong, and the images to fail with it.

The rq adapter (worker/rq_source.py) claims jobs; when rq cannot load one (a date it cannot parse,
bytes that are not UTF-8, a key that is not a hash, no data, an id it refuses) or loads it but its
arguments cannot be used (data not JSON, a pickle, the wrong shape), this module words the reason,
never empty, naming the suspect fields and quoting the first bytes of a bad value; it salvages the
image ids the job's data (else its meta) still names, and fails those of them that are still waiting,
with the job's reason. It reads job records through the job format's owner (broker/jobs.py) and
never imports rq.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from broker.jobs import arguments_in_data, image_ids_in_meta, is_job_date, load_meta, parse_job_arguments
from broker.store import QueueStore

log = logging.getLogger("segqueue.worker.rq")

_BINARY_FIELDS = {"data", "result", "exc_info"}  # job hash fields rq stores compressed or serialized
_DATE_FIELDS = ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat")
_PREVIEW = 80  # bytes of a bad value quoted in a reason
_ERROR_CHARS = 200  # of rq's own error message (some quote the whole job hash)


@dataclass(frozen=True)
class UnreadableJob:
    """A claimed job rq cannot load. `record` is the failed rq job the adapter writes in its place
    (None when rq cannot build one, e.g. for an id rq refuses); `image_ids` are those its data still names."""

    job_id: str
    reason: str
    image_ids: list[str] = field(default_factory=list)
    record: Any = None


def exc_text(exc: BaseException) -> str:
    """`Type: message`, falling back on the cause's message: never just a bare or empty name."""
    text = str(exc) or (f"{type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ else "")
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (no message)"


def bad_data_reason(data: bytes, cause: BaseException | None) -> str:
    """Why a job's `data` (rq's serialized [function, instance, args, kwargs]) cannot be read."""
    preview = repr(bytes(data[:_PREVIEW]))
    if data[:1] == b"\x80":  # the opcode every pickle of protocol 2 or later starts with
        return ("bad job: its data looks like a Python pickle, which segqueue never unpickles (jobs are "
                f"written with rq's JSON serializer): {preview}")
    detail = exc_text(cause) if cause is not None else "no detail"
    if isinstance(cause, (UnicodeDecodeError, json.JSONDecodeError)):
        return f"bad job: its data is not valid JSON (rq's JSON serializer could not read it: {detail}): {preview}"
    return f"bad job: its data is JSON but not rq's [function, instance, args, kwargs] ({detail}): {preview}"


def unreadable_record_reason(raw: dict[bytes, bytes], exc: Exception) -> str:
    """Why rq could not load a job hash: the suspect fields, then rq's own error."""
    suspects = "; ".join(_suspect_fields(raw))
    named = f" ({suspects})" if suspects else ""
    return f"bad job: rq cannot read its record{named}: {exc_text(exc)[:_ERROR_CHARS]}"


def _suspect_fields(raw: dict[bytes, bytes]) -> list[str]:
    """Fields of a job hash that rq cannot read: names or text values that are not UTF-8, bad dates."""
    suspects = []
    for name, value in raw.items():
        try:
            text_name = name.decode()
        except UnicodeDecodeError:
            suspects.append(f"field name {bytes(name[:_PREVIEW])!r} is not UTF-8")
            continue
        if text_name in _BINARY_FIELDS:
            continue
        try:
            text = value.decode()
        except UnicodeDecodeError:
            suspects.append(f"{text_name}={bytes(value[:_PREVIEW])!r} is not UTF-8")
            continue
        if text_name in _DATE_FIELDS and text and not is_job_date(text):
            suspects.append(f"{text_name}={text[:_PREVIEW]!r} is not a date")
    if b"data" not in raw:
        suspects.append("there is no data field")
    return suspects


def not_a_hash_reason(client: redis.Redis, key: str) -> str:
    """Why a job key that is not a hash cannot be read, quoting a string's first bytes."""
    kind = cast(bytes, client.type(key)).decode()  # replies are not decoded
    preview = f": {client.getrange(key, 0, _PREVIEW - 1)!r}" if kind == "string" else ""
    return f"bad job: its record {key} is a Redis {kind}, not the hash rq keeps jobs in{preview}"


def salvaged_image_ids(raw: dict[bytes, bytes]) -> list[str]:
    """The image ids an unreadable job's data still names, else those its meta names (broker.jobs.job_meta),
    or [] if neither can be read."""
    try:
        return parse_job_arguments(arguments_in_data(raw.get(b"data") or b""))
    except Exception:  # anything unreadable: look in the meta
        pass
    try:
        return image_ids_in_meta(load_meta(raw.get(b"meta") or b"{}"))
    except Exception:  # not JSON either: no ids to salvage
        return []


def report_unreadable(store: QueueStore, bad: UnreadableJob) -> None:
    """Log an unreadable job; fail its images still waiting; keep it in the store if rq has no record of it."""
    where = "rq's failed job registry" if bad.record is not None else store.bad_jobs_key
    log.error("job %s cannot be read by rq and is recorded as failed in %s: %s", bad.job_id, where, bad.reason)
    if bad.record is None:
        store.record_bad_job(bad.job_id, bad.reason)
    fail_waiting_images(store, bad.job_id, bad.reason, bad.image_ids)


def fail_waiting_images(store: QueueStore, job_id: str, reason: str, image_ids: list[str]) -> None:
    """Fail, with the reason of their failed job, those of its images that have no outcome and are still stored."""
    if not image_ids:
        return
    waiting = [i for i, seen in zip(image_ids, store.resolved(image_ids), strict=True) if not seen]
    waiting = [i for i, kept in zip(waiting, store.still_stored(waiting), strict=True) if kept]
    if waiting:
        store.save_results([], [(i, f"its job {job_id} failed: {reason}") for i in waiting])
