"""Pins the rq internals the batching worker relies on (worker/rq_jobs.py). If rq changes them, this fails first."""

import inspect

import rq
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.worker import SimpleWorker

from worker.rq_jobs import BatchingRqWorker


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_rq_minor_version_is_the_one_the_worker_was_written_against():
    assert rq.__version__.startswith("2.12."), rq.__version__


def test_worker_hooks_keep_their_signatures():
    assert params(SimpleWorker.prepare_execution) == ["self", "job"]
    assert params(SimpleWorker.prepare_job_execution) == ["self", "job", "remove_from_intermediate_queue"]
    assert params(SimpleWorker.handle_job_success) == ["self", "job", "queue", "started_job_registry"]
    assert params(SimpleWorker.handle_job_failure)[:5] == ["self", "job", "queue", "started_job_registry", "exc_string"]
    assert params(SimpleWorker.heartbeat) == ["self", "timeout", "pipeline"]
    assert params(SimpleWorker.get_heartbeat_ttl) == ["self", "job"]
    for name in ("bootstrap", "teardown", "run_maintenance_tasks", "should_run_maintenance_tasks", "clean_registries"):
        assert hasattr(SimpleWorker, name), name
    # our override really overrides something rq calls; maintenance is rq's own (registries and
    # the intermediate list, under a lock released after each pass), run every maintenance_interval
    assert BatchingRqWorker.get_heartbeat_ttl is not SimpleWorker.get_heartbeat_ttl
    assert BatchingRqWorker.clean_registries is SimpleWorker.clean_registries
    source = inspect.getsource(SimpleWorker.clean_registries)
    assert "intermediate_queue.cleanup" in source and "release_maintenance_lock" in source


def test_batched_claim_primitives_keep_their_signatures():
    # worker/rq_jobs.py claim_many() replays prepare_execution + prepare_job_execution over a pipeline
    assert params(Execution.create) == ["job", "ttl", "pipeline", "worker_name"]
    assert params(Job.prepare_for_execution) == ["self", "worker_name", "pipeline"]
    assert params(Job.fetch_many) == ["job_ids", "connection", "serializer"]
    prepare = inspect.getsource(SimpleWorker.prepare_job_execution)
    for step in ("job.heartbeat", "job.prepare_for_execution", "lrem(queue.intermediate_queue_key"):
        assert step in prepare, step


def test_execution_and_job_heartbeats_keep_their_signatures():
    assert params(Execution.heartbeat) == ["self", "started_job_registry", "ttl", "pipeline"]
    assert params(Job.heartbeat)[:4] == ["self", "timestamp", "ttl", "pipeline"]
    assert "xx" in params(Job.heartbeat)


def test_queue_keys_the_worker_moves_jobs_between(client):
    queue = Queue("pin", connection=client)
    assert queue.intermediate_queue_key.startswith("rq:")
    assert queue.registry_cleaning_key.startswith("rq:")
    assert isinstance(queue.key, str)
