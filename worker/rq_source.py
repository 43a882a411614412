"""The rq adapter of the worker's job source: the one file of the worker that talks to rq.

A segmentation job is an ordinary rq job (JSON serializer) whose function is never called: this
adapter claims jobs reliably (LMOVE into rq's intermediate list, then into the started registry
with an Execution), heartbeats them, and completes them with the same Redis records rq's own
worker writes, so job status, results, `Retry`, the failed registry, `rq info` and rq-dashboard all
behave as for any rq job. Claims and completions are pipelined over many jobs, so that small jobs
do not each pay rq's round trips. rq features the batched completion does not replay, because
`producer enqueue` never uses them: dependents, repeats, rate-limit slots and webhooks.

Every rq internal used here is pinned by tests/test_rq_internals.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from broker.store import parse_job_arguments
from worker.job_source import Claim

log = logging.getLogger("segqueue.worker.rq")


@dataclass(frozen=True)
class _RqHandle:
    """rq's objects for one claimed job (the Claim's opaque handle)."""

    job: Job
    execution: Execution


class RqJobSource:
    """JobSource over one rq queue. `open()` registers the worker with rq, `close()` deregisters it.

    job_heartbeat_ttl_s: seconds a claimed job stays started without a heartbeat before a live
    worker's maintenance (every maintenance_interval_s) re-enqueues it.
    """

    def __init__(self, client: redis.Redis, queue_name: str, *, name: str,
                 job_heartbeat_ttl_s: int, maintenance_interval_s: int) -> None:
        self.queue = Queue(queue_name, connection=client, serializer=JSONSerializer)
        self.client = client
        self.name = name
        self.job_heartbeat_ttl_s = job_heartbeat_ttl_s
        self._rq = SimpleWorker([self.queue], name=name, connection=client, serializer=JSONSerializer,
                                maintenance_interval=maintenance_interval_s,
                                worker_ttl=max(30, job_heartbeat_ttl_s))

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Register with rq (birth, pubsub commands), so `rq info` and dashboards list this worker."""
        self._rq.bootstrap(logging_level="WARNING")

    def close(self) -> None:
        """Deregister from rq (death, pubsub)."""
        self._rq.teardown()

    # --- claiming --------------------------------------------------------------------------

    def claim(self, max_jobs: int, timeout_s: float) -> list[Claim]:
        """Start up to `max_jobs` queued jobs, waiting at most `timeout_s` for the first."""
        while True:
            job_ids = self._move(max(1, max_jobs), timeout_s)
            if not job_ids:
                return []
            claims = self._start(job_ids)
            if claims:
                return claims
            timeout_s = 0.0  # every moved job was unusable: look again, without waiting

    def _move(self, count: int, timeout_s: float) -> list[str]:
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
        return [raw.decode() for raw in moved]

    def _fetch(self, job_ids: list[str]) -> list[Job | None]:
        """The jobs in one round trip; None for a job that is gone or that rq cannot read."""
        try:
            return Job.fetch_many(job_ids, connection=self.client, serializer=JSONSerializer)
        except Exception:  # one unreadable job hash spoils fetch_many: read them one by one
            jobs: list[Job | None] = []
            for job_id in job_ids:
                try:
                    jobs.append(Job.fetch(job_id, connection=self.client, serializer=JSONSerializer))
                except Exception as exc:
                    log.error("job %s cannot be read by rq and is dropped: %s", job_id, exc)
                    jobs.append(None)
            return jobs

    def _start(self, job_ids: list[str]) -> list[Claim]:
        """Start jobs already on the intermediate list, in one more round trip whatever their number.

        These are the steps of rq's prepare_execution + prepare_job_execution (an Execution in the
        started registry, job status "started", off the intermediate list), pipelined over the jobs.
        """
        intermediate_key = self.queue.intermediate_queue_key
        ttl = self.job_heartbeat_ttl_s
        handles = []
        with self.client.pipeline() as pipe:
            for job_id, job in zip(job_ids, self._fetch(job_ids)):
                pipe.lrem(intermediate_key, 1, job_id)
                if job is None:
                    continue
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                job.heartbeat(now(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                handles.append(_RqHandle(job, execution))
            self._rq.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self._rq.heartbeat(self._rq.worker_ttl + 60, pipeline=pipe)
            pipe.execute()
        claims = []
        for handle in handles:
            try:
                claims.append(Claim(handle.job.id, parse_job_arguments(handle.job.args), handle))
            except Exception as exc:  # BadJob, or rq's DeserializationError on garbled arguments
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.fail([Claim(handle.job.id, [], handle)], f"bad job: {reason}", retry=False)
        return claims

    # --- keeping alive ---------------------------------------------------------------------

    def keep_alive(self, claims: Sequence[Claim]) -> None:
        """Extend the worker's and every open claim's heartbeat (one round trip)."""
        ttl = self.job_heartbeat_ttl_s
        with self.client.pipeline() as pipe:
            self._rq.heartbeat(self._rq.worker_ttl + 60, pipeline=pipe)
            for claim in claims:
                if not claim.closed:
                    handle: _RqHandle = claim.handle
                    handle.execution.heartbeat(handle.job.started_job_registry, ttl, pipeline=pipe)
                    handle.job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()

    def queued(self) -> int:
        """Jobs waiting in the queue (one LLEN)."""
        return self.queue.count

    def maintain(self) -> None:
        """rq's own registry maintenance, on rq's schedule (re-enqueues jobs of dead workers)."""
        if self._rq.should_run_maintenance_tasks:
            self._rq.run_maintenance_tasks()

    # --- completing ------------------------------------------------------------------------

    def complete(self, claims: Sequence[Claim]) -> None:
        """Finish every claim that has a good image in one transaction; fail the others (no retry).

        Per job these are the records of rq's handle_job_success: status finished, a successful
        Result with the per-image outcomes, the finished registry, the job's expiry, the
        execution removed from the started registry; plus the worker's counters.
        """
        finished = [claim for claim in claims if claim.any_ok]
        if finished:
            with self.client.pipeline() as pipe:
                for claim in finished:
                    self._record_success(claim, pipe)
                pipe.execute()
        for claim in claims:
            if not claim.any_ok:
                self.fail([claim], claim.failure_reason(), retry=False)

    def _record_success(self, claim: Claim, pipe: redis.client.Pipeline) -> None:
        handle: _RqHandle = claim.handle
        job, execution = handle.job, handle.execution
        job.ended_at = now()
        result_ttl = job.get_result_ttl(self._rq.default_result_ttl)
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        if result_ttl != 0:
            job.save(pipeline=pipe, include_meta=False, include_result=False)
            Result.create(job, Result.Type.SUCCESSFUL, ttl=result_ttl, return_value=claim.result(),
                          worker_name=self.name, pipeline=pipe, execution_id=execution.id,
                          execution_started_at=execution.created_at, execution_ended_at=job.ended_at)
            job.finished_job_registry.add(job, result_ttl, pipe)
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
        self._rq.cleanup_execution(job, pipeline=pipe, execution=execution)
        self._rq.increment_successful_job_count(pipeline=pipe)
        self._rq.increment_total_working_time(job.ended_at - job.started_at, pipe)

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

