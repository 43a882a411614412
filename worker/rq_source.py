"""The rq adapter of the worker's job source: the one file of the worker that talks to rq.

A segmentation job is an ordinary rq job (JSON serializer) whose function is never called: this
adapter claims jobs reliably (LMOVE into rq's intermediate list, then into the started registry
with an Execution), heartbeats them, and completes them with the same Redis records rq's own
worker writes, so job status, results, `Retry`, the failed registry, `rq info` and rq-dashboard all
behave as for any rq job. Claims and completions are pipelined over many jobs, with one command
per key the jobs share, so that small jobs do not each pay rq's round trips. rq features the
batched completion does not replay, because `producer enqueue` never uses them: dependents,
repeats, rate-limit slots and webhooks.

A queued job rq cannot load (a date it cannot parse, bytes that are not UTF-8, a key that is not a
hash, no data) is taken off the queue and its record replaced, in the claim's transaction, by a
failed rq job whose result and exc_info give the reason: it shows in the failed registry, `rq info`
and `producer status`. One rq cannot even build a job for (an id it refuses) is recorded in the
queue's store instead (QueueStore.record_bad_job). Either way the reason is logged with the job id,
and the images its data (else its meta) still names are failed with it. A job whose record rq loads
but whose arguments cannot be used (data not JSON, a pickle) fails (no retry) with a reason that says
what is wrong with them, and so do the images its meta names.

Every rq internal used here is pinned by tests/unit/test_rq_internals.py.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import uuid4

import redis
from rq import Queue
from rq.exceptions import DeserializationError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, str_to_date, utcformat
from rq.worker import SimpleWorker, WorkerStatus
from rq.worker_registration import clean_worker_registry

from broker.store import JOB_FUNC, QueueStore, image_ids_in_meta, job_arguments, parse_job_arguments
from worker.job_source import Claim

log = logging.getLogger("segqueue.worker.rq")

MAINTENANCE_LOCK_S = 5  # cleaning takes milliseconds; rq's own lock lasts 899 s (see RqJobSource.maintain)
STUCK_CLAIM_S = 5.0  # a job on the intermediate list this long was claimed by a worker that died
COMMAND_POLL_S = 0.2  # the command thread's longest wait for a message, hence for its stop (rq waits 60 s)


class _RqWorker(SimpleWorker):
    """rq's SimpleWorker, with a command thread (rq's `shutdown` and other pubsub commands) that stops at once.

    rq's subscribe runs redis-py's PubSubWorkerThread with sleep_time=60, and its unsubscribe sends
    UNSUBSCRIBE before stopping that thread: the thread reads the reply, finds itself subscribed to
    nothing and waits up to 60 s for a subscription, while redis-py's stop() joins it. Here the thread
    waits COMMAND_POLL_S at a time, and is stopped before its connection is closed (which ends the
    subscription on the server): teardown takes at most COMMAND_POLL_S for it.
    """

    def subscribe(self) -> None:
        """rq's subscribe (same channel, handler and exception handler), with a COMMAND_POLL_S wait."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=COMMAND_POLL_S, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)

    def unsubscribe(self) -> None:
        """Stop the command thread (it notices within COMMAND_POLL_S), then close its connection."""
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        thread.stop()  # clears its run flag (recent redis-py also joins it)
        thread.join(timeout=5)  # the thread closes the pubsub itself on the way out
        pubsub.close()
        self.pubsub_thread = None


@dataclass(frozen=True)
class _RqHandle:
    """rq's objects for one claimed job (the Claim's opaque handle)."""

    job: Job
    execution: Execution


@dataclass(frozen=True)
class _Unreadable:
    """A claimed job rq cannot load. `record` is the failed rq job written in its place (None when
    rq cannot build one, e.g. for an id rq refuses); `image_ids` are those its data still names."""

    job_id: str
    reason: str
    image_ids: list[str] = field(default_factory=list)
    record: Job | None = None


_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # transient: never a reason to fail a job
_BINARY_FIELDS = {"data", "result", "exc_info"}  # job hash fields rq stores compressed or serialized
_DATE_FIELDS = ("created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat")
_PREVIEW = 80  # bytes of a bad value quoted in a reason
_ERROR_CHARS = 200  # of rq's own error message (some quote the whole job hash)


def _exc_text(exc: BaseException) -> str:
    """`Type: message`, falling back on the cause's message: never just a bare or empty name."""
    text = str(exc) or (f"{type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ else "")
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (no message)"


def _bad_data_reason(data: bytes, cause: BaseException | None) -> str:
    """Why a job's `data` (rq's serialized [function, instance, args, kwargs]) cannot be read."""
    preview = repr(bytes(data[:_PREVIEW]))
    if data[:1] == b"\x80":  # the opcode every pickle of protocol 2 or later starts with
        return ("bad job: its data looks like a Python pickle, which segqueue never unpickles (jobs are "
                f"written with rq's JSON serializer): {preview}")
    detail = _exc_text(cause) if cause is not None else "no detail"
    if isinstance(cause, (UnicodeDecodeError, json.JSONDecodeError)):
        return f"bad job: its data is not valid JSON (rq's JSON serializer could not read it: {detail}): {preview}"
    return f"bad job: its data is JSON but not rq's [function, instance, args, kwargs] ({detail}): {preview}"


def _bad_arguments_reason(job: Job, exc: Exception) -> str:
    """The failure reason of a claimed job whose arguments cannot be used (never empty)."""
    if isinstance(exc, DeserializationError):  # rq raises it without a message, from the real error
        return _bad_data_reason(job.data, exc.__cause__)
    return f"bad job: {_exc_text(exc)}"


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
        if text_name in _DATE_FIELDS and text and not _is_date(text):
            suspects.append(f"{text_name}={text[:_PREVIEW]!r} is not a date")
    if b"data" not in raw:
        suspects.append("there is no data field")
    return suspects


def _is_date(text: str) -> bool:
    """Whether rq can read `text` as one of its job dates."""
    try:
        str_to_date(text)
    except ValueError:
        return False
    return True


def _unreadable_record_reason(raw: dict[bytes, bytes], exc: Exception) -> str:
    """Why rq could not load a job hash: the suspect fields, then rq's own error."""
    suspects = "; ".join(_suspect_fields(raw))
    named = f" ({suspects})" if suspects else ""
    return f"bad job: rq cannot read its record{named}: {_exc_text(exc)[:_ERROR_CHARS]}"


def _salvaged_image_ids(raw: dict[bytes, bytes]) -> list[str]:
    """The image ids an unreadable job's data still names, else those its meta names (QueueStore.job_meta),
    or [] if neither can be read."""
    data = raw.get(b"data") or b""
    try:
        data = zlib.decompress(data)
    except zlib.error:
        pass  # rq falls back on uncompressed data the same way
    try:
        _func, _instance, args, _kwargs = JSONSerializer.loads(data)
        return parse_job_arguments(args)
    except Exception:  # anything unreadable: look in the meta
        pass
    try:
        return image_ids_in_meta(JSONSerializer.loads(raw.get(b"meta") or b"{}"))
    except Exception:  # not JSON either: no ids to salvage
        return []


class RqJobSource:
    """JobSource over one rq queue. `open()` registers the worker with rq, `close()` deregisters it.

    job_heartbeat_ttl_s: seconds a claimed job stays started without a heartbeat before a live
    worker's maintenance (every maintenance_interval_s) re-enqueues it.
    """

    def __init__(self, client: redis.Redis, queue_name: str, *, name: str,
                 job_heartbeat_ttl_s: int, maintenance_interval_s: int) -> None:
        self.queue = Queue(queue_name, connection=client, serializer=JSONSerializer)
        # built once: rq builds one per job
        self._finished_registry = self.queue.finished_job_registry
        self._started_registry = self.queue.started_job_registry
        self.client = client
        self.store = QueueStore(client, queue_name)
        self.name = name
        self.job_heartbeat_ttl_s = job_heartbeat_ttl_s
        self._rq = _RqWorker([self.queue], name=name, connection=client, serializer=JSONSerializer,
                                maintenance_interval=maintenance_interval_s,
                                worker_ttl=max(30, job_heartbeat_ttl_s))

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Register with rq (birth, pubsub commands), so `rq info` and dashboards list this worker."""
        self._rq.bootstrap(logging_level="WARNING")

    def close(self) -> None:
        """Deregister from rq (death, pubsub); within COMMAND_POLL_S plus two round trips (see _RqWorker)."""
        self._rq.teardown()

    # --- claiming --------------------------------------------------------------------------

    def claim(self, max_jobs: int, timeout_s: float) -> list[Claim]:
        """Start up to `max_jobs` queued jobs, waiting at most `timeout_s` for the first."""
        while True:
            raw_ids = self._move(max(1, max_jobs), timeout_s)
            if not raw_ids:
                return []
            claims = self._start(raw_ids)
            if claims:
                return claims
            timeout_s = 0.0  # every moved job was unusable: look again, without waiting

    def _move(self, count: int, timeout_s: float) -> list[bytes]:
        """Move up to `count` job ids onto rq's intermediate list (rq's reliable dequeue)."""
        moved: list[bytes] = []
        if timeout_s > 0:
            first = self.client.blmove(self.queue.key, self.queue.intermediate_queue_key, timeout_s)
            if first is None:
                return []
            moved.append(first)
            count -= 1
        if count > 0:
            pipe = self.client.pipeline(transaction=False)
            for _ in range(count):
                pipe.lmove(self.queue.key, self.queue.intermediate_queue_key)
            moved.extend(raw for raw in pipe.execute() if raw is not None)
        return moved

    def _fetch(self, raw_ids: list[bytes]) -> list[Job | _Unreadable | None]:
        """The jobs in one round trip; None for a job that is gone, _Unreadable for one rq cannot load."""
        try:
            return Job.fetch_many([raw.decode() for raw in raw_ids], connection=self.client,
                                  serializer=JSONSerializer)
        except _REDIS_DOWN:
            raise
        except Exception:  # one unreadable job spoils fetch_many: read them one by one
            return [self._fetch_one(raw) for raw in raw_ids]

    def _fetch_one(self, raw_id: bytes) -> Job | _Unreadable | None:
        """One job, read as rq's fetch_many reads it, or why rq cannot read it."""
        try:
            job_id = raw_id.decode()
        except UnicodeDecodeError:
            return _Unreadable(raw_id.decode(errors="backslashreplace"), "bad job: its id is not UTF-8 text")
        try:
            job = Job(job_id, connection=self.client, serializer=JSONSerializer)
        except (TypeError, ValueError) as exc:
            return _Unreadable(job_id, f"bad job: rq refuses its id: {_exc_text(exc)}")
        try:
            raw = self.client.hgetall(job.key)
        except redis.ResponseError:  # WRONGTYPE: the key holds something other than a hash
            return self._unreadable(job_id, self._not_a_hash_reason(job.key), [])
        if not raw:
            return None
        try:
            job.restore(raw)
        except Exception as exc:  # whatever rq's restore trips on: a bad date, bytes, a number, ...
            return self._unreadable(job_id, _unreadable_record_reason(raw, exc), _salvaged_image_ids(raw))
        return job

    def _not_a_hash_reason(self, key: str) -> str:
        """Why a job key that is not a hash cannot be read, quoting a string's first bytes."""
        kind = self.client.type(key).decode()
        preview = f": {self.client.getrange(key, 0, _PREVIEW - 1)!r}" if kind == "string" else ""
        return f"bad job: its record {key} is a Redis {kind}, not the hash rq keeps jobs in{preview}"

    def _unreadable(self, job_id: str, reason: str, image_ids: list[str]) -> _Unreadable:
        """An unreadable job, with the failed rq job that is to replace its record (if rq can build one)."""
        try:
            record = Job.create(JOB_FUNC, args=job_arguments(image_ids) if image_ids else [], id=job_id,
                                connection=self.client, serializer=JSONSerializer, origin=self.queue.name,
                                status=JobStatus.FAILED, description=f"unreadable job {job_id}, recorded as failed")
        except Exception as exc:  # rq cannot build a job for it: recorded in the queue's store instead
            log.warning("rq cannot build a failed record for job %s: %s", job_id, _exc_text(exc))
            record = None
        else:
            record.ended_at = now()
        return _Unreadable(job_id, reason, image_ids, record)

    def _start(self, raw_ids: list[bytes]) -> list[Claim]:
        """Start jobs already on the intermediate list, in one more round trip whatever their number.

        These are the records of rq's prepare_execution + prepare_job_execution (an Execution in the
        started registry, job status "started", off the intermediate list), pipelined over the jobs,
        with one command per shared key for all of them (tests/integration/test_rq_records.py compares the
        result with rq's own). A job rq cannot load is taken off the list and recorded as failed in
        the same transaction.
        """
        handles, unreadable = [], []
        with self.client.pipeline() as pipe:
            for raw_id, job in zip(raw_ids, self._fetch(raw_ids)):
                pipe.lrem(self.queue.intermediate_queue_key, 1, raw_id)
                if isinstance(job, Job):
                    handles.append(self._prepare(job, pipe))
                elif isinstance(job, _Unreadable):
                    self._record_failed(job, pipe)
                    unreadable.append(job)
                else:
                    log.warning("job %s was queued but its record is gone; skipped",
                                raw_id.decode(errors="backslashreplace"))
            if handles:
                self._register_executions([handle.execution for handle in handles], pipe)
            self._rq.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self._rq.heartbeat(self._rq.worker_ttl + 60, pipeline=pipe)
            pipe.execute()
        for bad in unreadable:
            self._report_unreadable(bad)
        return [claim for handle in handles if (claim := self._claim_or_fail(handle)) is not None]

    def _prepare(self, job: Job, pipe: redis.client.Pipeline) -> _RqHandle:
        """Queue the per-job steps that start one job on `pipe`: its Execution and its own registry
        (rq's Execution.create, less the shared keys), status started, no expiry. rq's job.heartbeat
        is left out: prepare_for_execution writes last_heartbeat again in the same transaction."""
        ttl = self.job_heartbeat_ttl_s
        execution = Execution(id=uuid4().hex, job_id=job.id, connection=self.client, worker_name=self.name)
        execution.save(ttl=ttl, pipeline=pipe)
        ExecutionRegistry(job_id=job.id, connection=pipe).add(execution=execution, ttl=ttl, pipeline=pipe)
        job.prepare_for_execution(self.name, pipeline=pipe)
        pipe.persist(job.key)
        return _RqHandle(job, execution)

    def _register_executions(self, executions: Sequence[Execution], pipe: redis.client.Pipeline) -> None:
        """The rest of rq's Execution.create for many executions: one ZADD to the started registry and
        one SADD (and EXPIRE) to this worker's execution index, instead of one each per job."""
        ttl = self.job_heartbeat_ttl_s
        started_until = current_timestamp() + ttl  # StartedJobRegistry.add_execution's score
        pipe.zadd(self._started_registry.key, {execution.composite_key: started_until for execution in executions})
        index = executions[0].worker_executions_key
        pipe.sadd(index, *(execution.composite_key for execution in executions))
        pipe.expire(index, ttl + 60)

    def _record_failed(self, bad: _Unreadable, pipe: redis.client.Pipeline) -> None:
        """Replace an unreadable job's record by a failed rq job: status, reason, result, failed registry."""
        if bad.record is None:
            return
        pipe.delete(bad.record.key)
        bad.record._handle_failure(bad.reason, pipeline=pipe, worker_name=self.name)
        self._rq.increment_failed_job_count(pipeline=pipe)

    def _report_unreadable(self, bad: _Unreadable) -> None:
        """Log an unreadable job; fail its images still waiting; keep it in the store if rq has no record of it."""
        where = "rq's failed job registry" if bad.record is not None else self.store.bad_jobs_key
        log.error("job %s cannot be read by rq and is recorded as failed in %s: %s", bad.job_id, where, bad.reason)
        if bad.record is None:
            self.store.record_bad_job(bad.job_id, bad.reason)
        self._fail_waiting_images(bad.job_id, bad.reason, bad.image_ids)

    def _fail_waiting_images(self, job_id: str, reason: str, image_ids: list[str]) -> None:
        """Fail, with the reason of their failed job, those of its images that have no outcome and are still stored."""
        if not image_ids:
            return
        waiting = [i for i, seen in zip(image_ids, self.store.resolved(image_ids), strict=True) if not seen]
        waiting = [i for i, kept in zip(waiting, self.store.still_stored(waiting), strict=True) if kept]
        if waiting:
            self.store.save_results([], [(i, f"its job {job_id} failed: {reason}") for i in waiting])

    def _claim_or_fail(self, handle: _RqHandle) -> Claim | None:
        """The Claim of a started job, or None after failing it (no retry) if its arguments are unusable;
        then the images its meta names (QueueStore.job_meta) fail with it."""
        try:
            return Claim(handle.job.id, parse_job_arguments(handle.job.args), handle)
        except Exception as exc:  # BadJob, or rq's DeserializationError on garbled arguments
            reason = _bad_arguments_reason(handle.job, exc)
            self.fail([Claim(handle.job.id, [], handle)], reason, retry=False)
            self._fail_waiting_images(handle.job.id, reason, image_ids_in_meta(handle.job.meta))
            return None

    # --- keeping alive ---------------------------------------------------------------------

    def keep_alive(self, claims: Sequence[Claim]) -> None:
        """Extend the worker's and every open claim's heartbeat (one round trip)."""
        ttl = self.job_heartbeat_ttl_s
        with self.client.pipeline() as pipe:
            self._rq.heartbeat(self._rq.worker_ttl + 60, pipeline=pipe)
            for claim in claims:
                if not claim.closed:
                    handle: _RqHandle = claim.handle
                    handle.execution.heartbeat(self._started_registry, ttl, pipeline=pipe)
                    handle.job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()

    def queued(self) -> int:
        """Jobs waiting in the queue (one LLEN)."""
        return self.queue.count

    def maintain(self) -> None:
        """Registry maintenance on rq's schedule, with rq's own steps but a short lock (re-enqueues jobs of dead workers).

        rq's run_maintenance_tasks takes a 899 s lock and deletes it when done: a worker killed while
        cleaning (the soak did it) stops every worker's maintenance on the queue for 15 minutes, and
        rq recovers a job left on the intermediate list only after a fixed minute. Here the lock
        lasts MAINTENANCE_LOCK_S (a longer one is such a leftover, and is cleared), and such a job is
        recovered after STUCK_CLAIM_S (this adapter moves a job off that list within one round trip
        of putting it there).
        """
        if not self._rq.should_run_maintenance_tasks:
            return
        self._rq.last_cleaned_at = now()
        lock = self.queue.registry_cleaning_key
        if self.client.ttl(lock) > MAINTENANCE_LOCK_S:
            self.client.delete(lock)  # rq's 899 s lock, left by a worker that died while cleaning
        if not self.client.set(lock, self.name, nx=True, ex=MAINTENANCE_LOCK_S):
            return  # another worker is cleaning
        try:
            clean_registries(self.queue)
            clean_worker_registry(self.queue)
            self._recover_stuck_claims()
        finally:
            self.client.delete(lock)

    def _recover_stuck_claims(self) -> None:
        """Fail (rq retries them) jobs left on the intermediate list by a worker that died between claim round trips."""
        intermediate = self.queue.intermediate_queue
        started = set(self.queue.started_job_registry.get_job_ids())
        for job_id in intermediate.get_job_ids():
            if job_id in started or intermediate.set_first_seen(job_id):
                continue  # being started, or seen for the first time now
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or (now() - first_seen).total_seconds() < STUCK_CLAIM_S:
                continue
            job = self.queue.fetch_job(job_id)
            if job is not None:
                self._rq.handle_job_failure(job, self.queue, exc_string="the worker that claimed it died before starting it")
            intermediate.remove(job_id)

    # --- completing ------------------------------------------------------------------------

    def complete(self, claims: Sequence[Claim]) -> None:
        """Finish every claim that has a good image in one transaction; fail the others (no retry).

        Per job these are the records of rq's handle_job_success: status finished, a successful
        Result with the per-image outcomes, the finished registry, the job's expiry, the
        execution removed from the started registry; plus the worker's counters (successful jobs,
        working time). Keys shared by the jobs (the finished and started registries, the worker's
        execution index and counters) get one command for all of them.
        """
        finished = [claim for claim in claims if claim.any_ok]
        if finished:
            with self.client.pipeline() as pipe:
                handles: list[_RqHandle] = [claim.handle for claim in finished]
                finished_until = {}
                for claim, handle in zip(finished, handles):
                    result_ttl = self._record_success(claim, pipe)
                    if result_ttl != 0:
                        finished_until[handle.job.id] = self._registry_score(result_ttl)
                if finished_until:
                    pipe.zadd(self._finished_registry.key, finished_until)
                composite_keys = [handle.execution.composite_key for handle in handles]
                pipe.zrem(self._started_registry.key, *composite_keys)
                pipe.srem(handles[0].execution.worker_executions_key, *composite_keys)
                # the worker's counters, as rq's increment_* write them, once for all these jobs
                working_s = sum((h.job.ended_at - h.job.started_at).total_seconds() for h in handles)
                pipe.hincrby(self._rq.key, "successful_job_count", len(finished))
                pipe.hincrbyfloat(self._rq.key, "total_working_time", working_s)
                pipe.execute()
        for claim in claims:
            if not claim.any_ok:
                self.fail([claim], claim.failure_reason(), retry=False)

    @staticmethod
    def _registry_score(ttl: int) -> float | str:
        """A registry entry's expiry score, as rq's BaseRegistry.add computes it (-1: never)."""
        return "+inf" if ttl == -1 else ttl if ttl < 0 else current_timestamp() + ttl

    def _record_success(self, claim: Claim, pipe: redis.client.Pipeline) -> int:
        """Queue one finished job's own records on `pipe` (the shared keys are the caller's); its result TTL.

        The job hash gets the two fields that change (status, ended_at) in one HSET. Its expiry
        leaves out rq's EXPIREs of the dependents and dependencies keys, which jobs from
        `producer enqueue` never have.
        """
        handle: _RqHandle = claim.handle
        job, execution = handle.job, handle.execution
        job.ended_at = now()
        result_ttl = job.get_result_ttl(self._rq.default_result_ttl)
        if result_ttl != 0:
            # rq sets the status and then saves the whole job (to_dict), whose other fields are
            # those read at claim time plus what this worker has written since: only these change
            pipe.hset(job.key, mapping={"status": JobStatus.FINISHED, "ended_at": utcformat(job.ended_at)})
            Result.create(job, Result.Type.SUCCESSFUL, ttl=result_ttl, return_value=claim.result(),
                          worker_name=self.name, pipeline=pipe, execution_id=execution.id,
                          execution_started_at=execution.created_at, execution_ended_at=job.ended_at)
        else:
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
        if result_ttl > 0:
            pipe.expire(job.key, result_ttl)
        else:
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        pipe.delete(execution.key)  # rq's Execution.delete, less the shared keys
        ExecutionRegistry(job_id=job.id, connection=pipe).remove(execution=execution, pipeline=pipe)
        return result_ttl

    def fail(self, claims: Sequence[Claim], reason: str, retry: bool) -> None:
        """Fail each job through rq's own failure handling (Retry, failed registry, result)."""
        for claim in claims:
            handle: _RqHandle = claim.handle
            job = handle.job
            if not retry:
                job.retries_left = 0
            job.ended_at = now()
            try:
                self._rq.handle_job_failure(job=job, queue=self.queue, started_job_registry=self.queue.started_job_registry,
                                            exc_string=reason, execution=handle.execution)
            except redis.RedisError as exc:
                log.error("could not record the failure of job %s (%s); rq re-enqueues it after its "
                          "heartbeat TTL", job.id, exc)

