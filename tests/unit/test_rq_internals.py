"""Pins every rq internal of worker/rq_source.py and worker/rq_worker.py: if rq changes one, this fails first."""

import inspect

import redis
import rq
import rq.command
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.results import Result
from rq.worker import SimpleWorker, WorkerStatus

import worker.rq_source as rq_source


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_rq_minor_version_is_the_one_the_adapter_was_written_against():
    assert rq.__version__.startswith("3.0."), rq.__version__


def test_only_the_adapter_imports_rq_in_the_worker():
    from pathlib import Path

    worker_dir = Path(rq_source.__file__).parent
    importers = sorted(p.name for p in worker_dir.glob("*.py")
                       if any(line.startswith(("import rq", "from rq")) for line in p.read_text().splitlines()))
    assert importers == ["rq_source.py", "rq_worker.py"]


def test_worker_methods_the_adapter_calls_keep_their_signatures():
    assert params(SimpleWorker.bootstrap)[:2] == ["self", "logging_level"]
    assert params(SimpleWorker.teardown) == ["self"]
    assert params(SimpleWorker.heartbeat) == ["self", "timeout", "pipeline"]
    assert params(SimpleWorker.set_state) == ["self", "state", "pipeline"]
    assert params(SimpleWorker.handle_job_failure) == ["self", "job", "queue", "started_job_registry",
                                                        "exc_string", "execution"]
    assert params(SimpleWorker.cleanup_execution) == ["self", "job", "pipeline", "execution"]
    assert params(SimpleWorker.increment_successful_job_count) == ["self", "pipeline"]
    assert params(SimpleWorker.increment_total_working_time) == ["self", "job_execution_time", "pipeline"]
    assert params(SimpleWorker.run_maintenance_tasks) == ["self"]
    assert isinstance(inspect.getattr_static(SimpleWorker, "should_run_maintenance_tasks"), property)
    for name in ("default_result_ttl", "worker_ttl"):
        assert name in inspect.getsource(SimpleWorker.__init__), name
    assert WorkerStatus.BUSY
    # maintenance replays rq's steps (RqWorker.clean_registries, rq's own maintenance hook) with a short lock
    assert "self.clean_registries()" in inspect.getsource(SimpleWorker.run_maintenance_tasks)
    source = inspect.getsource(SimpleWorker.clean_registries)
    for step in ("acquire_maintenance_lock", "clean_registries(queue",
                 "worker_registration.clean_worker_registry(queue)", "intermediate_queue.cleanup",
                 "release_maintenance_lock", "self.last_cleaned_at = now()"):
        assert step in source, step
    assert "registry_cleaning_key" in inspect.getsource(Queue.acquire_maintenance_lock)
    from rq.intermediate_queue import IntermediateQueue
    from rq.registry import clean_registries
    from rq.worker_registration import clean_worker_registry

    assert params(clean_registries)[:1] == ["queue"] and params(clean_worker_registry) == ["queue"]
    for name in ("get_job_ids", "set_first_seen", "get_first_seen", "remove"):
        assert callable(getattr(IntermediateQueue, name)), name
    assert isinstance(inspect.getattr_static(Queue, "intermediate_queue"), property)


def test_the_command_thread_the_adapter_replaces_is_rqs():
    # _RqWorker.subscribe/unsubscribe replace rq's, which bootstrap and teardown call, keeping rq's channel,
    # handler and exception handler (rq's `shutdown` command sends the worker SIGINT from that thread)
    assert "self.subscribe()" in inspect.getsource(SimpleWorker.bootstrap)
    assert "self.unsubscribe()" in inspect.getsource(SimpleWorker.teardown)
    subscribe = inspect.getsource(SimpleWorker.subscribe)
    for step in ("self.pubsub = self.connection.pubsub()",
                 "self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})",
                 "run_in_thread(", "exception_handler=self._pubsub_exception_handler"):
        assert step in subscribe, step
    unsubscribe = inspect.getsource(SimpleWorker.unsubscribe)
    assert "self.pubsub_thread" in unsubscribe and "self.pubsub.close()" in unsubscribe
    assert "os.kill(pid, signal.SIGINT)" in inspect.getsource(rq.command.handle_shutdown_command)
    from redis.client import PubSubWorkerThread

    assert "sleep_time" in params(PubSubWorkerThread.__init__)
    assert "timeout=sleep_time" in inspect.getsource(PubSubWorkerThread.run)


def test_a_retried_job_goes_back_to_the_front_of_the_queue_when_its_retry_says_so():
    # producer.enqueue gives jobs Retry(enqueue_at_front=True): every retry path (a dead worker's job
    # found by maintenance, a stuck claim, a failed batch) goes through Job.retry
    from rq import Retry
    from rq.registry import StartedJobRegistry

    assert "enqueue_at_front" in params(Retry.__init__)
    assert "job.retry(queue, pipeline)" in inspect.getsource(StartedJobRegistry.cleanup)
    assert "job.retry(queue, pipeline)" in inspect.getsource(SimpleWorker.handle_job_failure)
    assert "at_front=self.enqueue_at_front_on_retry" in inspect.getsource(Job.retry)
    assert "job.enqueue_at_front_on_retry = retry.enqueue_at_front" in inspect.getsource(Queue.create_job)
    assert "obj['enqueue_at_front_on_retry']" in inspect.getsource(Job.to_dict)


def test_claim_replays_rqs_own_preparation_steps():
    # RqJobSource._start replays prepare_execution + prepare_job_execution over one pipeline
    assert params(Execution.create) == ["job", "ttl", "pipeline", "worker_name"]
    assert params(Job.prepare_for_execution) == ["self", "worker_name", "pipeline"]
    assert params(Job.fetch_many) == ["job_ids", "connection", "serializer"]
    # RqJobSource._fetch_many is fetch_many step for step, with its HGETALLs pipelined outside a transaction
    fetch_many = inspect.getsource(Job.fetch_many)
    for step in ("parsed_ids = [parse_job_id(job_id) for job_id in job_ids]", "with connection.pipeline() as pipeline",
                 "pipeline.hgetall(cls.key_for(job_id))", "if not results[i]:",
                 "job = cls(job_id, connection=connection, serializer=serializer)", "job.restore(results[i])"):
        assert step in fetch_many, step
    from rq.job import parse_job_id

    assert parse_job_id("abc:exec") == "abc" and Job.key_for("abc") == "rq:job:abc"
    prepare = inspect.getsource(SimpleWorker.prepare_job_execution)
    for step in ("job.heartbeat", "job.prepare_for_execution", "pipeline.persist(job.key)",
                 "lrem(queue.intermediate_queue_key"):
        assert step in prepare, step
    assert "Execution.create" in inspect.getsource(inspect.getmodule(Execution).prepare_execution)
    # _prepare + _register_executions split Execution.create into per-job steps and one command per shared key
    assert params(Execution.__init__) == ["self", "id", "job_id", "connection", "worker_name"]
    assert params(Execution.save) == ["self", "ttl", "pipeline"]
    create = inspect.getsource(Execution.create)
    for step in ("uuid4().hex", "execution.save(ttl=ttl, pipeline=pipeline)",
                 "ExecutionRegistry(job_id=job.id, connection=pipeline)"
                 ".add(execution=execution, ttl=ttl, pipeline=pipeline)",
                 "job.started_job_registry.add_execution(execution, pipeline=pipeline, ttl=ttl, xx=False)",
                 "pipeline.sadd(execution.worker_executions_key, execution.composite_key)",
                 "pipeline.expire(execution.worker_executions_key, ttl + 60)"):
        assert step in create, step
    from rq.registry import BaseRegistry, StartedJobRegistry

    assert "current_timestamp() + ttl" in inspect.getsource(StartedJobRegistry.add_execution)
    assert "current_timestamp() + ttl" in inspect.getsource(BaseRegistry.add)
    assert "score = '+inf'" in inspect.getsource(BaseRegistry.add)
    # job.heartbeat only writes last_heartbeat, which prepare_for_execution writes again: the adapter skips it
    assert "hset(self.key, 'last_heartbeat'" in inspect.getsource(Job.heartbeat)
    assert "'last_heartbeat': utcformat(self.last_heartbeat)" in inspect.getsource(Job.prepare_for_execution)


def test_completion_replays_rqs_own_success_records():
    # RqJobSource._record_success writes what handle_job_success + Job._handle_success write
    success = inspect.getsource(SimpleWorker.handle_job_success)
    for step in ("increment_successful_job_count", "increment_total_working_time", "job._handle_success",
                 "job.cleanup(result_ttl, pipeline=pipeline, remove_from_queue=False)", "self.cleanup_execution"):
        assert step in success, step
    handle = inspect.getsource(Job._handle_success)
    for step in ("set_status(JobStatus.FINISHED",
                 "self.save(pipeline=pipeline, include_meta=False, include_result=False)", "Result.create",
                 "finished_job_registry.add(self, result_ttl, pipeline)"):
        assert step in handle, step
    assert params(Result.create)[:3] == ["job", "type", "ttl"]
    for name in ("return_value", "worker_name", "pipeline", "execution_id", "execution_started_at",
                 "execution_ended_at"):
        assert name in params(Result.create), name
    assert params(Job.get_result_ttl) == ["self", "default_ttl"]
    assert params(Job.set_status)[:3] == ["self", "status", "pipeline"]
    assert params(Job.cleanup) == ["self", "ttl", "pipeline", "remove_from_queue"]
    # _record_success writes the fields rq's save changes (tests/integration/test_rq_records.py checks which) and the
    # execution's removal without the shared keys, which complete() removes with one command for all the jobs
    assert "self.save(pipeline=pipeline, include_meta=False, include_result=False)" in handle
    assert "'ended_at': utcformat(self.ended_at) if self.ended_at else ''" in inspect.getsource(Job.to_dict)
    delete = inspect.getsource(Execution.delete)
    for step in ("pipeline.delete(self.key)",
                 "job.started_job_registry.remove_execution(execution=self, pipeline=pipeline)",
                 "ExecutionRegistry(job_id=self.job_id, connection=self.connection)"
                 ".remove(execution=self, pipeline=pipeline)",
                 "pipeline.srem(self.worker_executions_key, self.composite_key)"):
        assert step in delete, step
    cleanup = inspect.getsource(Job.cleanup)
    assert "connection.expire(self.dependents_key, ttl)" in cleanup and "connection.expire(self.key, ttl)" in cleanup
    assert JobStatus.FINISHED == "finished"
    # the worker's counters are added up and written with its heartbeat (_SuccessCounters), under rq's own field names
    assert "'successful_job_count', 1" in inspect.getsource(SimpleWorker.increment_successful_job_count)
    assert "'total_working_time'" in inspect.getsource(SimpleWorker.increment_total_working_time)


def test_heartbeats_keep_their_signatures():
    assert params(Execution.heartbeat) == ["self", "started_job_registry", "ttl", "pipeline"]
    assert params(Job.heartbeat)[:4] == ["self", "timestamp", "ttl", "pipeline"]
    assert "xx" in params(Job.heartbeat)


def test_queue_keys_the_adapter_moves_jobs_between():
    client = redis.Redis.from_url("redis://127.0.0.1:1/0")  # never connected: the keys are computed locally
    queue = Queue("pin", connection=client)
    assert queue.intermediate_queue_key.startswith("rq:")
    assert queue.registry_cleaning_key.startswith("rq:")
    assert isinstance(queue.key, str)


def test_what_recording_an_unreadable_job_relies_on():
    # RqJobSource._fetch_one reads a job as fetch_many does; _record_failed replaces an unreadable
    # record by a failed Job.create'd job through rq's own failure records
    from rq.exceptions import DeserializationError
    from rq.utils import str_to_date

    assert "job.restore(results[i])" in inspect.getsource(Job.fetch_many)
    assert params(Job.restore) == ["self", "raw_data"]
    assert "validate_job_id(id)" in inspect.getsource(Job.__init__)
    for name in ("id", "status", "origin", "description", "serializer", "connection"):
        assert name in params(Job.create), name
    assert params(Job._handle_failure)[:4] == ["self", "exc_string", "pipeline", "worker_name"]
    handle = inspect.getsource(Job._handle_failure)
    assert "failed_job_registry.add(" in handle and "Result.create_failure(" in handle
    assert params(SimpleWorker.increment_failed_job_count) == ["self", "pipeline"]
    # job.args raises a DeserializationError without a message, chained from the serializer's error
    assert "raise DeserializationError() from e" in inspect.getsource(Job._deserialize_data)
    assert issubclass(DeserializationError, Exception)
    assert str_to_date("2026-01-02T03:04:05.000006Z").microsecond == 6


def test_worker_heartbeat_that_producer_status_reads():
    # producer.status.live_workers reads the worker hash's last_heartbeat (rq.utils.utcformat, UTC)
    from rq import worker_registration
    from rq.utils import utcparse

    beat = inspect.getsource(SimpleWorker.heartbeat)
    assert "hset(self.key, 'last_heartbeat', utcformat(self.last_heartbeat))" in beat
    assert params(worker_registration.get_keys) == ["queue", "connection"]
    assert utcparse("2026-01-02T03:04:05.000006Z").tzinfo is not None


def test_status_counts_a_worker_alive_for_three_of_its_heartbeat_intervals():
    from pathlib import Path

    from broker.connection import BrokerSettings
    from producer.status import WORKER_ALIVE_WITHIN_S
    from worker.settings import WorkerSettings

    settings = WorkerSettings(broker=BrokerSettings(redis_url="redis://x", queue="q"), engine_path=Path("e.onnx"))
    assert 3 * settings.heartbeat_interval_s <= WORKER_ALIVE_WITHIN_S


def test_what_mark_busy_relies_on():
    # RqWorker.mark_busy writes the state only when get_state() differs and the heartbeat only when
    # last_heartbeat is old: both are attributes rq's own set_state and heartbeat keep up to date
    assert "self._state = state" in inspect.getsource(SimpleWorker.set_state)
    assert "return self._state" in inspect.getsource(SimpleWorker.get_state)
    assert "self.last_heartbeat = now()" in inspect.getsource(SimpleWorker.heartbeat)
