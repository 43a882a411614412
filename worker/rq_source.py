"""The rq adapter of the worker's job source: with the rq worker it runs (worker/rq_worker.py), the worker's rq files.

A segmentation job is an ordinary rq job (format: broker/jobs.py) whose function is never called:
each method here is one step of rq's own worker, replayed with the Redis records rq writes, so job
status, results, `Retry`, the failed registry, `rq info` and rq-dashboard behave as for any rq job.
Claims and completions are pipelined over many jobs, with one command per key the jobs share
(tests/integration/test_rq_records.py compares the records with rq's own, key by key); the worker's
counters of finished jobs are written with its heartbeat, not with each completion (_SuccessCounters). A
claim also reads the records of its images enqueued by reference (QueueStore.read_references). Not replayed, because
`producer enqueue` never uses them: dependents, repeats, rate-limit slots and webhooks. A job rq
cannot load, or whose arguments cannot be used, is failed with a reason worded by worker/unreadable.py.

rq internals touched here (rq 3.0.x), each pinned by a test of tests/unit/test_rq_internals.py:
- SimpleWorker bootstrap, teardown, heartbeat, set_state, handle_job_failure, should_run_maintenance_tasks and
  clean_registries (RqWorker's), worker_ttl, default_result_ttl, the worker hash's counter fields:
  test_worker_methods_the_adapter_calls_keep_their_signatures
- claim (_fetch_many, _start, _prepare, _register_executions): Job.fetch_many's steps (parse_job_id, key_for,
  restore) without its transaction; prepare_execution and prepare_job_execution split into
  Execution(...).save, ExecutionRegistry.add, Job.prepare_for_execution, the started registry's score and
  the worker's execution index: test_claim_replays_rqs_own_preparation_steps
- completion (_record_success, complete): handle_job_success and Job._handle_success (status and ended_at,
  Result.create, finished registry score, Job.cleanup, Execution.delete):
  test_completion_replays_rqs_own_success_records
- keep_alive: Execution.heartbeat, Job.heartbeat(xx=): test_heartbeats_keep_their_signatures
- Queue.key, intermediate_queue_key, registry_cleaning_key: test_queue_keys_the_adapter_moves_jobs_between
- an unreadable job (_fetch_one, _unreadable, _record_failed): Job.__init__'s id check, Job.restore as
  fetch_many uses it, Job.create, the private Job._handle_failure, increment_failed_job_count,
  DeserializationError from job.args: test_what_recording_an_unreadable_job_relies_on
- Retry(enqueue_at_front=True) reaching Job.retry on every failure path:
  test_a_retried_job_goes_back_to_the_front_of_the_queue_when_its_retry_says_so
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast
from uuid import uuid4

import redis
from rq.exceptions import DeserializationError
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus, parse_job_id
from rq.results import Result
from rq.utils import current_timestamp, now, utcformat

from broker import jobs
from broker.store import QueueStore
from worker import unreadable
from worker.job_source import Claim, ResultWrites
from worker.rq_worker import RqWorker
from worker.unreadable import UnreadableJob, exc_text

log = logging.getLogger("segqueue.worker.rq")


@dataclass(frozen=True)
class _RqHandle:
    """rq's objects for one claimed job (the Claim's opaque handle)."""

    job: Job
    execution: Execution


_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # transient: never a reason to fail a job


def _image_ids(job: Job) -> list[str]:
    """A job's image ids, or none if its arguments are unusable (_claim_or_fail then fails it)."""
    try:
        return jobs.parse_job_arguments(job.args)
    except Exception:  # BadJob, or rq's DeserializationError
        return []


class _SuccessCounters:
    """rq's worker counters of finished jobs (successful_job_count, total_working_time) not yet written.

    rq's worker adds them on every success; the adapter adds them up here and writes them with the
    worker's heartbeat (keep_alive, every few seconds) and when it closes: two commands per heartbeat
    instead of two per completion. Nothing of the product reads them; `rq info` and dashboards see
    them at most one heartbeat late, and a worker killed outright loses the last heartbeat's worth
    (its worker record expires anyway). Thread-safe: the writer thread adds, the lease thread writes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs = 0
        self._seconds = 0.0

    def add(self, finished_jobs: int, working_seconds: float) -> None:
        with self._lock:
            self._jobs += finished_jobs
            self._seconds += working_seconds

    def take(self) -> tuple[int, float]:
        """The counts not yet written, which are now the caller's (give them back if writing them fails)."""
        with self._lock:
            taken, self._jobs, self._seconds = (self._jobs, self._seconds), 0, 0.0
        return taken

    def give_back(self, taken: tuple[int, float]) -> None:
        self.add(*taken)


class RqJobSource:
    """JobSource over one rq queue. `open()` registers the worker with rq, `close()` deregisters it.

    job_heartbeat_ttl_s: seconds a claimed job stays started without a heartbeat before a live
    worker's maintenance (every maintenance_interval_s) re-enqueues it.
    """

    def __init__(self, client: redis.Redis, queue_name: str, *, name: str,
                 job_heartbeat_ttl_s: int, maintenance_interval_s: int) -> None:
        self.queue = jobs.segmentation_queue(client, queue_name)
        self._finished_registry = self.queue.finished_job_registry  # built once: rq builds one per job
        self._started_registry = self.queue.started_job_registry
        self.client = client
        self.store = QueueStore(client, queue_name)
        self.name = name
        self.job_heartbeat_ttl_s = job_heartbeat_ttl_s
        self._rq = RqWorker([self.queue], name=name, connection=client, serializer=jobs.SERIALIZER,
                            maintenance_interval=maintenance_interval_s, worker_ttl=max(30, job_heartbeat_ttl_s))
        self._counters = _SuccessCounters()
        self._move_limit: int | None = None  # most LMOVEs the next claim sends (_move); None: as many as it wants

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Register with rq (birth, pubsub commands), so `rq info` and dashboards list this worker."""
        self._rq.bootstrap(logging_level="WARNING")

    def close(self) -> None:
        """Write the worker's counters still held, then deregister from rq (death, pubsub); within RqWorker's
        COMMAND_POLL_S plus three round trips."""
        with self.client.pipeline() as pipe:
            self._execute_with_counters(pipe)
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
        """Move up to `count` job ids onto rq's intermediate list (rq's reliable dequeue).

        The LMOVEs of one call go in one round trip. After a call that found fewer jobs than it asked
        for (the queue ran dry), the next asks for at most twice as many as it found (at least one),
        and each call that gets all it asked for doubles that limit until it no longer binds: a
        worker polling a queue that is empty or nearly so sends one LMOVE or a few per poll, not one
        per job its fetch window could take.
        """
        moved: list[bytes] = []
        if timeout_s > 0:
            first = self.client.blmove(self.queue.key, self.queue.intermediate_queue_key,
                                       timeout_s)  # type: ignore[arg-type]  # redis-py types it int; floats work
            if first is None:
                return []
            moved.append(cast(bytes, first))
            count -= 1
        if count > 0:
            asked = count if self._move_limit is None else min(count, self._move_limit)
            pipe = self.client.pipeline(transaction=False)
            for _ in range(asked):
                pipe.lmove(self.queue.key, self.queue.intermediate_queue_key)
            found = [raw for raw in pipe.execute() if raw is not None]
            if len(found) < asked:
                self._move_limit = max(1, 2 * len(found))
            elif self._move_limit is not None:
                self._move_limit = None if 2 * asked >= count else 2 * asked
            moved.extend(found)
        return moved

    def _fetch(self, raw_ids: list[bytes]) -> list[Job | UnreadableJob | None]:
        """The jobs in one round trip; None for a job that is gone, UnreadableJob for one rq cannot load."""
        try:
            fetched: list[Job | UnreadableJob | None] = []
            fetched.extend(self._fetch_many([raw.decode() for raw in raw_ids]))
            return fetched
        except _REDIS_DOWN:
            raise
        except Exception:  # one unreadable job spoils the lot: read them one by one
            return [self._fetch_one(raw) for raw in raw_ids]

    def _fetch_many(self, job_ids: list[str]) -> list[Job | None]:
        """rq's Job.fetch_many, step for step, but its HGETALLs are pipelined without MULTI/EXEC (rq wraps
        them in a transaction, which reads of independent hashes do not need: two commands fewer per claim)."""
        parsed_ids = [parse_job_id(job_id) for job_id in job_ids]
        pipe = self.client.pipeline(transaction=False)
        for job_id in parsed_ids:
            pipe.hgetall(Job.key_for(job_id))
        fetched: list[Job | None] = []
        for job_id, raw in zip(parsed_ids, pipe.execute(), strict=True):
            if not raw:
                fetched.append(None)
                continue
            job = Job(job_id, connection=self.client, serializer=jobs.SERIALIZER)
            job.restore(raw)
            fetched.append(job)
        return fetched

    def _fetch_one(self, raw_id: bytes) -> Job | UnreadableJob | None:
        """One job, read as rq's fetch_many reads it, or why rq cannot read it."""
        try:
            job_id = raw_id.decode()
        except UnicodeDecodeError:
            return UnreadableJob(raw_id.decode(errors="backslashreplace"), "bad job: its id is not UTF-8 text")
        try:
            job = Job(job_id, connection=self.client, serializer=jobs.SERIALIZER)
        except (TypeError, ValueError) as exc:
            return UnreadableJob(job_id, f"bad job: rq refuses its id: {exc_text(exc)}")
        try:
            raw = cast(dict[bytes, bytes], self.client.hgetall(job.key))  # replies are not decoded
        except redis.ResponseError:  # WRONGTYPE: the key holds something other than a hash
            return self._unreadable(job_id, unreadable.not_a_hash_reason(self.client, job.key), [])
        if not raw:
            return None
        try:
            job.restore(raw)
        except Exception as exc:  # whatever rq's restore trips on: a bad date, bytes, a number, ...
            reason = unreadable.unreadable_record_reason(raw, exc)
            return self._unreadable(job_id, reason, unreadable.salvaged_image_ids(raw))
        return job

    def _unreadable(self, job_id: str, reason: str, image_ids: list[str]) -> UnreadableJob:
        """An unreadable job, with the failed rq job that is to replace its record (if rq can build one)."""
        try:
            record = Job.create(jobs.JOB_FUNC, args=jobs.job_arguments(image_ids) if image_ids else [], id=job_id,
                                connection=self.client, serializer=jobs.SERIALIZER, origin=self.queue.name,
                                status=JobStatus.FAILED, description=f"unreadable job {job_id}, recorded as failed")
        except Exception as exc:  # rq cannot build a job for it: recorded in the queue's store instead
            log.warning("rq cannot build a failed record for job %s: %s", job_id, exc_text(exc))
            return UnreadableJob(job_id, reason, image_ids, None)
        record.ended_at = now()
        return UnreadableJob(job_id, reason, image_ids, record)

    def _start(self, raw_ids: list[bytes]) -> list[Claim]:
        """Start jobs already on the intermediate list, in one more round trip whatever their number.

        These are the records of rq's prepare_execution + prepare_job_execution (an Execution in the
        started registry, job status "started", off the intermediate list), pipelined over the jobs,
        with one command per shared key for all of them (tests/integration/test_rq_records.py compares the
        result with rq's own). A job rq cannot load is taken off the list and recorded as failed in
        the same transaction. The same round trip reads the jobs' image records enough to use those
        enqueued by reference (QueueStore.read_references): they travel with the claims, and fetching
        their batches costs no round trip.
        """
        handles, unusable = [], []
        with self.client.pipeline() as pipe:
            for raw_id, job in zip(raw_ids, self._fetch(raw_ids), strict=True):
                pipe.lrem(self.queue.intermediate_queue_key, 1, raw_id)  # type: ignore[arg-type]  # bytes: as listed
                if isinstance(job, Job):
                    handles.append(self._prepare(job, pipe))
                elif isinstance(job, UnreadableJob):
                    self._record_failed(job, pipe)
                    unusable.append(job)
                else:
                    log.warning("job %s was queued but its record is gone; skipped",
                                raw_id.decode(errors="backslashreplace"))
            if handles:
                self._register_executions([handle.execution for handle in handles], pipe)
            self._rq.mark_busy(pipe)
            started = len(pipe)
            reads = self.store.read_references(pipe, [i for handle in handles for i in _image_ids(handle.job)])
            replies = pipe.execute(raise_on_error=False)
        errors = [reply for reply in replies[:started] if isinstance(reply, Exception)]
        if errors:  # as pipe.execute() raises (every command of the transaction ran)
            raise errors[0]
        records = reads(replies[started:])  # images enqueued by reference: the fetch needs no round trip
        for bad in unusable:
            unreadable.report_unreadable(self.store, bad)
        return [claim for handle in handles if (claim := self._claim_or_fail(handle, records)) is not None]

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

    def _record_failed(self, bad: UnreadableJob, pipe: redis.client.Pipeline) -> None:
        """Replace an unreadable job's record by a failed rq job: status, reason, result, failed registry."""
        if bad.record is None:
            return
        pipe.delete(bad.record.key)
        bad.record._handle_failure(bad.reason, pipeline=pipe, worker_name=self.name)
        self._rq.increment_failed_job_count(pipeline=pipe)

    def _claim_or_fail(self, handle: _RqHandle, records: dict[str, dict[bytes, bytes]]) -> Claim | None:
        """The Claim of a started job, with the image `records` read with it, or None after failing it (no retry)
        if its arguments are unusable; then the images its meta names (broker.jobs.job_meta) fail with it."""
        try:
            image_ids = jobs.parse_job_arguments(handle.job.args)
            return Claim(handle.job.id, image_ids, handle, records={i: records[i] for i in image_ids if i in records})
        except Exception as exc:  # BadJob, or rq's DeserializationError on garbled arguments
            # job.args raises rq's DeserializationError, without a message, from the serializer's error
            if isinstance(exc, DeserializationError):
                reason = unreadable.bad_data_reason(handle.job.data, exc.__cause__)
            else:
                reason = f"bad job: {exc_text(exc)}"
            self.fail([Claim(handle.job.id, [], handle)], reason, retry=False)
            unreadable.fail_waiting_images(self.store, handle.job.id, reason, jobs.image_ids_in_meta(handle.job.meta))
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
            self._execute_with_counters(pipe)

    def _execute_with_counters(self, pipe: redis.client.Pipeline) -> None:
        """Add the worker's counters of jobs finished since they were last written to `pipe`, as rq's increment_*
        write them (HINCRBY, HINCRBYFLOAT; nothing if none finished), and execute it; if Redis fails, the
        counters are kept for the next write."""
        finished, seconds = taken = self._counters.take()
        if finished:
            pipe.hincrby(self._rq.key, "successful_job_count", finished)
            pipe.hincrbyfloat(self._rq.key, "total_working_time", seconds)
        try:
            pipe.execute()
        except redis.RedisError:
            self._counters.give_back(taken)
            raise

    def queued(self) -> int:
        """Jobs waiting in the queue (one LLEN)."""
        return self.queue.count

    def maintain(self) -> None:
        """rq's registry maintenance step when due (re-enqueues jobs of dead workers), with a short lock (RqWorker)."""
        if self._rq.should_run_maintenance_tasks:
            self._rq.clean_registries()

    # --- completing ------------------------------------------------------------------------

    def complete(self, claims: Sequence[Claim], results: ResultWrites | None = None) -> None:
        """Finish every claim that has a good image in one transaction; fail the others (no retry).

        Per job these are the records of rq's handle_job_success: status finished, a successful
        Result with the per-image outcomes, the finished registry, the job's expiry, the
        execution removed from the started registry. Keys shared by the jobs (the finished and started
        registries, the worker's execution index) get one command for all of them. The worker's counters
        (successful jobs, working time) are added up and written with its next heartbeat
        (_SuccessCounters). `results` (the batch's image outcomes, QueueStore.save_results) go first in
        the same transaction: one round trip for both.
        """
        finished = [claim for claim in claims if claim.any_ok]
        with self.client.pipeline() as pipe:  # nothing is sent if nothing was queued
            if results is not None:
                results(pipe)
            if finished:
                self._record_finished(finished, pipe)
            pipe.execute()
        if finished:
            self._counters.add(len(finished), sum(jobs.working_seconds(claim.handle.job) for claim in finished))
        for claim in claims:
            if not claim.any_ok:
                self.fail([claim], claim.failure_reason(), retry=False)

    def _record_finished(self, finished: Sequence[Claim], pipe: redis.client.Pipeline) -> None:
        """Queue the records of finished jobs on `pipe`: each job's own, then one command per shared key."""
        handles: list[_RqHandle] = [claim.handle for claim in finished]
        finished_until = {}
        for claim, handle in zip(finished, handles, strict=True):
            result_ttl = self._record_success(claim, pipe)
            if result_ttl != 0:
                finished_until[handle.job.id] = jobs.registry_score(result_ttl)
        if finished_until:
            pipe.zadd(self._finished_registry.key, finished_until)
        composite_keys = [handle.execution.composite_key for handle in handles]
        pipe.zrem(self._started_registry.key, *composite_keys)
        pipe.srem(handles[0].execution.worker_executions_key, *composite_keys)

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
                self._rq.handle_job_failure(job=job, queue=self.queue,
                                            started_job_registry=self.queue.started_job_registry,
                                            exc_string=reason, execution=handle.execution)
            except redis.RedisError as exc:
                log.error("could not record the failure of job %s (%s); rq re-enqueues it after its "
                          "heartbeat TTL", job.id, exc)

