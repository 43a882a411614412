"""rq's side of the worker: claiming jobs, keeping them alive, and completing them through rq itself.

`BatchingRqWorker` is a non-forking rq `SimpleWorker` that never runs a job function. It claims
jobs one by one (reliably: LMOVE into rq's intermediate list, then into the started registry),
lets the pipeline pack their images into batches across jobs, and completes each job with rq's
own success/failure handling, so job status, results, `Retry`, the failed registry, `rq info` and
rq-dashboard all behave as for any rq job. The rq internals used here are pinned by
tests/test_rq_internals.py.
"""

from __future__ import annotations

import signal
import traceback
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from broker.errors import BadJob
from broker.store import parse_job_arguments


@dataclass(eq=False)
class ClaimedJob:
    """A job this worker has started: its images, and what became of each (image id -> outcome)."""

    job: Job
    execution: Execution
    image_ids: list[str]
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    closed: bool = False  # set only by worker.claims.OpenClaims.close(): no longer heartbeated or completed

    @property
    def complete(self) -> bool:
        """True once every image has an outcome."""
        return len(self.outcomes) == len(self.image_ids)


class BatchingRqWorker(SimpleWorker):
    """An rq worker whose jobs are completed by the batching pipeline, not by calling their function."""

    def __init__(self, queue: Queue, *, name: str, job_heartbeat_ttl_s: int, maintenance_interval_s: int) -> None:
        super().__init__(
            [queue],
            name=name,
            connection=queue.connection,
            serializer=JSONSerializer,
            maintenance_interval=maintenance_interval_s,
            worker_ttl=max(30, job_heartbeat_ttl_s),
        )
        self.queue = queue
        self.job_heartbeat_ttl_s = job_heartbeat_ttl_s
        self.signals_received = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Register with rq (birth, pubsub commands) and install warm-shutdown signal handlers."""
        self.bootstrap(logging_level="WARNING")
        self._install_signal_handlers()

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish what is claimed, then stop. A second signal stops at once."""
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGTERM, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.signals_received += 1
        self._stop_requested = True
        if self.signals_received > 1:
            raise SystemExit(1)

    @property
    def stop_requested(self) -> bool:
        return bool(self._stop_requested)

    def stop(self) -> None:
        """Deregister from rq (death, pubsub)."""
        self.teardown()

    # --- maintenance -----------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job) -> int:
        """Seconds a started job stays in the started registry without a heartbeat."""
        return self.job_heartbeat_ttl_s

    def maintain(self) -> None:
        """Run maintenance if it is due (rq's own schedule: `maintenance_interval`)."""
        if self.should_run_maintenance_tasks:
            self.run_maintenance_tasks()

    # --- claiming --------------------------------------------------------------------------

    def claim(self, timeout_s: float) -> list[ClaimedJob]:
        """Block at most `timeout_s` for the next job and start it; [] if the queue stayed empty."""
        job_id = self.connection.blmove(self.queue.key, self.queue.intermediate_queue_key, max(0.001, timeout_s))
        if job_id is None:
            return []
        return self._start([job_id.decode()]) or self.claim_many(1)

    def claim_many(self, count: int) -> list[ClaimedJob]:
        """Claim up to `count` queued jobs without blocking; [] only when the queue is empty.

        Jobs move reliably: LMOVE into rq's intermediate list, then (see `_start`) into the started
        registry. Jobs that turn out unreadable are failed and the next ones are tried.
        """
        while True:
            pipe = self.connection.pipeline(transaction=False)
            for _ in range(count):
                pipe.lmove(self.queue.key, self.queue.intermediate_queue_key)
            job_ids = [raw.decode() for raw in pipe.execute() if raw is not None]
            if not job_ids:
                return []
            claims = self._start(job_ids)
            if claims:
                return claims

    def _start(self, job_ids: list[str]) -> list[ClaimedJob]:
        """Start jobs already on the intermediate list, in two round trips whatever their number.

        The steps of rq's prepare_execution + prepare_job_execution (an Execution in the started
        registry, job status "started", off the intermediate list), pipelined over several jobs so
        that small jobs do not pay rq's round trips each.
        """
        intermediate_key = self.queue.intermediate_queue_key
        try:
            fetched = Job.fetch_many(job_ids, connection=self.connection, serializer=JSONSerializer)
        except Exception:  # an unreadable job hash: start them one by one, through rq's own steps
            return self._claim_each(job_ids)
        jobs = [job for job in fetched if job is not None]
        ttl = self.job_heartbeat_ttl_s
        executions = []
        with self.connection.pipeline() as pipe:
            for job_id, job in zip(job_ids, fetched):
                if job is None:
                    pipe.lrem(intermediate_key, 1, job_id)  # deleted meanwhile: nothing to complete
            for job in jobs:
                executions.append(Execution.create(job, ttl, pipeline=pipe, worker_name=self.name))
                job.heartbeat(now(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.lrem(intermediate_key, 1, job.id)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.heartbeat(self.worker_ttl + 60, pipeline=pipe)
            pipe.execute()
        return [claimed for job, execution in zip(jobs, executions)
                if (claimed := self._parse(job, execution)) is not None]

    def _claim_each(self, job_ids: list[str]) -> list[ClaimedJob]:
        """Start already-moved jobs one at a time (the slow path, for unreadable job data)."""
        claims = []
        for job_id in job_ids:
            try:
                job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            except Exception:
                self.connection.lrem(self.queue.intermediate_queue_key, 1, job_id)
                continue
            execution = self.prepare_execution(job)
            self.prepare_job_execution(job, remove_from_intermediate_queue=True)
            self.execution = None
            claimed = self._parse(job, execution)
            if claimed is not None:
                claims.append(claimed)
        return claims

    def _parse(self, job: Job, execution: Execution) -> ClaimedJob | None:
        """A ClaimedJob for a started job, or None after failing it (no retry) if its arguments are bad."""
        job.started_at = now()
        try:
            return ClaimedJob(job=job, execution=execution, image_ids=parse_job_arguments(job.args))
        except (BadJob, DeserializationError) as exc:
            self.fail(ClaimedJob(job, execution, []), f"{type(exc).__name__}: {exc}", retry=False)
            return None

    def keep_alive(self, claims: list[ClaimedJob]) -> None:
        """Extend the worker's and every open claim's heartbeat (one round trip)."""
        ttl = self.job_heartbeat_ttl_s
        with self.connection.pipeline() as pipe:
            self.heartbeat(self.worker_ttl + 60, pipeline=pipe)
            for claim in claims:
                if not claim.closed:
                    claim.execution.heartbeat(claim.job.started_job_registry, ttl, pipeline=pipe)
                    claim.job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()

    # --- completing ------------------------------------------------------------------------

    def finish(self, claim: ClaimedJob) -> None:
        """Complete a job as finished; its result is the per-image outcomes (JSON)."""
        job = claim.job
        self.execution = claim.execution
        job.ended_at = now()
        job._result = {"images": [claim.outcomes[i] for i in claim.image_ids]}
        job._status = JobStatus.FINISHED
        try:
            self.handle_job_success(job=job, queue=self.queue, started_job_registry=self.queue.started_job_registry)
        finally:
            self.execution = None

    def fail(self, claim: ClaimedJob, reason: str, retry: bool = True) -> None:
        """Complete a job as failed with `reason`; rq re-enqueues it if `retry` and retries are left."""
        job = claim.job
        if not retry:
            job.retries_left = 0
        self.execution = claim.execution
        job.ended_at = now()
        job._status = JobStatus.FAILED
        try:
            self.handle_job_failure(job=job, queue=self.queue, exc_string=reason)
        except redis.RedisError:
            self.log.error("could not record failure of job %s:\n%s", job.id, traceback.format_exc())
        finally:
            self.execution = None
