"""The rq worker the rq adapter (worker/rq_source.py) registers and runs rq's steps through.

rq's SimpleWorker, with two of its hooks overridden; with worker/rq_source.py, the only files of the
worker that import rq.

- The command thread (rq's `shutdown` and other pubsub commands) stops at once. rq's subscribe runs
  redis-py's PubSubWorkerThread with sleep_time=60, and its unsubscribe sends UNSUBSCRIBE before
  stopping that thread: the thread reads the reply, finds itself subscribed to nothing and waits up
  to 60 s for a subscription, while redis-py's stop() joins it. Here the thread waits COMMAND_POLL_S
  at a time, and is stopped before its connection is closed (which ends the subscription on the
  server): teardown takes at most COMMAND_POLL_S for it.
- A claim marks the worker busy (`mark_busy`) only when its state changes, and heartbeats it at
  most every BUSY_HEARTBEAT_S (rq's worker does both on every dequeue).
- Registry maintenance (`clean_registries`) replays rq's steps with a short lock. rq's takes a 899 s
  lock and deletes it when done: a worker killed while cleaning (the soak did it) stops every
  worker's maintenance on the queue for 15 minutes, and rq recovers a job left on the intermediate
  list only after a fixed minute. Here the lock lasts MAINTENANCE_LOCK_S (a longer one is such a
  leftover, and is cleared), and such a job is recovered after STUCK_CLAIM_S (the adapter moves a job
  off that list within one round trip of putting it there).

rq internals touched here, pinned by tests/unit/test_rq_internals.py: subscribe/unsubscribe (channel,
handle_payload, _pubsub_exception_handler, pubsub, pubsub_thread) and PubSubWorkerThread's sleep_time
(test_the_command_thread_the_adapter_replaces_is_rqs); clean_registries' steps and last_cleaned_at,
Queue.registry_cleaning_key, rq.registry.clean_registries, rq.worker_registration.clean_worker_registry,
the intermediate queue (get_job_ids, set_first_seen, get_first_seen, remove), handle_job_failure
(test_worker_methods_the_adapter_calls_keep_their_signatures); get_state and last_heartbeat as
set_state and heartbeat keep them (mark_busy: test_what_mark_busy_relies_on).
"""

from __future__ import annotations

from redis.client import Pipeline
from rq import Queue
from rq.registry import clean_registries
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus
from rq.worker_registration import clean_worker_registry

COMMAND_POLL_S = 0.2  # the command thread's longest wait for a message, hence for its stop (rq waits 60 s)
MAINTENANCE_LOCK_S = 5  # cleaning takes milliseconds; rq's own lock lasts 899 s
STUCK_CLAIM_S = 5.0  # a job on the intermediate list this long was claimed by a worker that died
BUSY_HEARTBEAT_S = 1.0  # a claim renews the worker's heartbeat (rq's worker: on every dequeue) at most this often


class RqWorker(SimpleWorker):
    """rq's SimpleWorker, with a command thread that stops at once and maintenance under a short lock."""

    def subscribe(self) -> None:
        """rq's subscribe (same channel, handler and exception handler), with a COMMAND_POLL_S wait."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]  # rq declares it as None
            sleep_time=COMMAND_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler)

    def unsubscribe(self) -> None:
        """Stop the command thread (it notices within COMMAND_POLL_S), then close its connection."""
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        thread.stop()  # clears its run flag (recent redis-py also joins it)
        thread.join(timeout=5)  # the thread closes the pubsub itself on the way out
        pubsub.close()
        self.pubsub_thread = None

    def mark_busy(self, pipeline: Pipeline) -> None:
        """What rq's worker writes about itself when it takes a job: state busy and a heartbeat, on `pipeline`.

        The state is written only when it changes (the adapter never sets it back while working) and
        the heartbeat at most every BUSY_HEARTBEAT_S (the lease thread also sends one every few
        seconds; the worker key lives worker_ttl + 60 s): a worker claiming many jobs a second
        writes its own hash about once a second instead of four commands per claim.
        """
        if self.get_state() != WorkerStatus.BUSY:
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        last = self.last_heartbeat
        if last is None or (now() - last).total_seconds() >= BUSY_HEARTBEAT_S:
            self.heartbeat(self.worker_ttl + 60, pipeline=pipeline)

    def clean_registries(self) -> None:
        """rq's registry maintenance of each queue (re-enqueues jobs of dead workers), under a
        MAINTENANCE_LOCK_S lock, then recovers claims stuck STUCK_CLAIM_S on the intermediate list."""
        self.last_cleaned_at = now()  # type: ignore[assignment]  # rq declares it as None
        for queue in self.queues:
            lock = queue.registry_cleaning_key
            if self.connection.ttl(lock) > MAINTENANCE_LOCK_S:
                self.connection.delete(lock)  # rq's 899 s lock, left by a worker that died while cleaning
            if not self.connection.set(lock, self.name, nx=True, ex=MAINTENANCE_LOCK_S):
                continue  # another worker is cleaning
            try:
                clean_registries(queue)
                clean_worker_registry(queue)
                self._recover_stuck_claims(queue)
            finally:
                self.connection.delete(lock)

    def _recover_stuck_claims(self, queue: Queue) -> None:
        """Fail (rq retries them) jobs left on the intermediate list by a worker that died between claim round trips."""
        intermediate = queue.intermediate_queue
        started = set(queue.started_job_registry.get_job_ids())
        for job_id in intermediate.get_job_ids():
            if job_id in started or intermediate.set_first_seen(job_id):
                continue  # being started, or seen for the first time now
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or (now() - first_seen).total_seconds() < STUCK_CLAIM_S:
                continue
            job = queue.fetch_job(job_id)
            if job is not None:
                self.handle_job_failure(job, queue, exc_string="the worker that claimed it died before starting it")
            intermediate.remove(job_id)
