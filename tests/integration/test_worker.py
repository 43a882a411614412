"""The batching worker against a real redis-server and a real ONNX Runtime engine, run in-process."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from broker.connection import BrokerSettings
from broker.jobs import segmentation_queue
from broker.store import QueueStore, StoredImage, new_image_id, now
from common.images import decode_image
from engines.base import infer
from engines.onnx_engine import OnnxEngine
from producer.enqueue import Enqueuer, enqueue_paths
from tests.conftest import SMALL_SIZE, tiny_checkpoint, write_synthetic_images
from worker.cli import serve
from worker.settings import WorkerSettings


def run_worker(redis_url: str, queue: str, engine: Path, log_file: Path, **overrides) -> list[dict]:
    """Run `worker run --burst` in this process; return its `batch` log records."""
    settings = WorkerSettings(
        broker=BrokerSettings(redis_url=redis_url, queue=queue),
        engine_path=engine,
        burst=True,
        log_file=log_file,
        **overrides,
    )
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert serve(settings) == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return batch_records(log_file)


def batch_records(log_file: Path) -> list[dict]:
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return [r for r in records if r["event"] == "batch"]


def enqueue_folder(client: redis.Redis, queue: str, folder: Path, job_size: int):
    enqueuer = Enqueuer(client, segmentation_queue(client, queue), job_size)
    return enqueue_paths(enqueuer, [folder], SMALL_SIZE, SMALL_SIZE)


def test_jobs_are_batched_across_job_boundaries(tmp_path, client, redis_url, queue_name, small_engine):
    write_synthetic_images(tmp_path / "images", 15)
    report = enqueue_folder(client, queue_name, tmp_path / "images", job_size=3)
    assert len(report.job_ids) == 5 and not report.rejected

    batches = run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log", max_wait_ms=300)

    assert [b["batch_size"] for b in batches] == [8, 7]
    assert batches[0]["jobs"] == 3  # 3 + 3 + the first 2 images of the third job
    assert batches[1]["jobs"] == 3  # the third job's last image + 3 + 3
    assert set(batches[0]["job_ids"]) & set(batches[1]["job_ids"])  # one job spans both batches
    for key in ("queue_wait_ms", "fetch_ms", "compute_ms", "write_ms", "total_ms", "img_per_s", "worker", "engine",
                "claim_ms", "handover_ms", "fetch_wait_ms", "engine_wait_ms"):
        assert key in batches[0]
    queue = segmentation_queue(client, queue_name)
    assert queue.finished_job_registry.count == 5
    for job_id in report.job_ids:
        job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED
        assert [r["ok"] for r in job.return_value()["images"]] == [True] * 3
    # rq's worker record counts every job, though completions add their counters once per batch
    worker_key = f"rq:worker:{batches[0]['worker']}"
    assert int(client.hget(worker_key, "successful_job_count")) == 5
    assert float(client.hget(worker_key, "total_working_time")) > 0


def test_worker_masks_equal_direct_engine_masks_bit_exact(tmp_path, client, redis_url, queue_name, small_engine):
    paths = write_synthetic_images(tmp_path / "images", 11, seed=3)
    report = enqueue_folder(client, queue_name, tmp_path / "images", job_size=4)
    run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log")

    store = QueueStore(client, queue_name)
    with OnnxEngine(small_engine) as engine:
        for image_id, path in zip(report.image_ids, paths, strict=True):
            pixels = decode_image(path, SMALL_SIZE, SMALL_SIZE).pixels
            direct = infer(engine, pixels[None])[0]
            stored = store.load_mask(image_id)
            assert stored is not None, path
            np.testing.assert_array_equal(stored, direct)


def test_a_bad_image_fails_alone(tmp_path, client, redis_url, queue_name, small_engine):
    write_synthetic_images(tmp_path / "images", 6)
    store = QueueStore(client, queue_name)
    good = enqueue_folder(client, queue_name, tmp_path / "images", job_size=6)
    # A job whose middle image is corrupt in Redis and whose last has the wrong size, among good ones.
    ids = [new_image_id() for _ in range(4)]
    pixels = np.zeros((SMALL_SIZE, SMALL_SIZE), np.uint8)
    store.store_images([StoredImage(image_id, f"{image_id}.png", np.zeros(shape, np.uint8), 64, 64, now())
                        for image_id, shape in zip(ids, [(SMALL_SIZE, SMALL_SIZE)] * 3 + [(32, 32)], strict=True)])
    client.hset(store._image_key(ids[1]), "data", b"truncated")  # damage the stored payload
    queue = segmentation_queue(client, queue_name)
    mixed = queue.enqueue_call("worker.jobs.segment_images", args=[ids], meta={"images": 4})

    run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log")

    assert all(store.load_mask(i) is not None for i in good.image_ids)
    assert store.load_mask(ids[0]) is not None and store.load_mask(ids[2]) is not None
    assert store.load_mask(ids[1]) is None and store.load_mask(ids[3]) is None
    failures = store.failures()
    assert set(failures) == {ids[1], ids[3]}
    assert "corrupt" in failures[ids[1]] and ids[1] in failures[ids[1]]
    assert "32x32" in failures[ids[3]] and "--size 64" in failures[ids[3]]
    job = Job.fetch(mixed.id, connection=client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED
    assert [r["ok"] for r in job.return_value()["images"]] == [True, False, True, False]
    np.testing.assert_array_equal(store.load_mask(ids[0]).shape, pixels.shape)


def test_a_job_with_unreadable_arguments_fails_without_retry(tmp_path, client, redis_url, queue_name, small_engine):
    write_synthetic_images(tmp_path / "images", 2)
    queue = segmentation_queue(client, queue_name)
    from rq import Retry

    bad = queue.enqueue_call("worker.jobs.segment_images", args=["not-a-list"], retry=Retry(max=3))
    good = enqueue_folder(client, queue_name, tmp_path / "images", job_size=2)

    run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log")

    bad_job = Job.fetch(bad.id, connection=client, serializer=JSONSerializer)
    assert bad_job.get_status() == JobStatus.FAILED
    assert "BadJob" in bad_job.latest_result().exc_string
    assert queue.failed_job_registry.count == 1
    assert Job.fetch(good.job_ids[0], connection=client, serializer=JSONSerializer).get_status() == JobStatus.FINISHED


def test_processing_an_image_twice_leaves_exactly_one_mask(tmp_path, client, redis_url, queue_name, small_engine):
    write_synthetic_images(tmp_path / "images", 3)
    report = enqueue_folder(client, queue_name, tmp_path / "images", job_size=3)
    run_worker(redis_url, queue_name, small_engine, tmp_path / "first.log")
    store = QueueStore(client, queue_name)
    first = {i: store.load_mask(i).copy() for i in report.image_ids}

    # The same images again, as a redelivered job would bring them.
    segmentation_queue(client, queue_name).enqueue_call("worker.jobs.segment_images", args=[report.image_ids])
    batches = run_worker(redis_url, queue_name, small_engine, tmp_path / "second.log")

    assert sum(b["batch_size"] for b in batches) == 3
    assert store.counts().done == 3
    assert store.record_counts()[1] == 3
    for image_id, mask in first.items():
        np.testing.assert_array_equal(store.load_mask(image_id), mask)


def test_max_batch_larger_than_the_engine_allows_is_refused(tmp_path, redis_url, queue_name, small_engine, capsys):
    import typer

    with pytest.raises(typer.Exit) as stopped:
        run_worker(redis_url, queue_name, small_engine, tmp_path / "w.log", max_batch=16)
    assert stopped.value.exit_code == 2
    assert "--max-batch 16" in capsys.readouterr().err


def test_worker_runs_a_torch_checkpoint_on_cpu(tmp_path, client, redis_url, queue_name):
    """`.pt` engines through the queue: masks equal the same TorchEngine's, run directly."""

    from engines.torch_engine import TorchEngine

    checkpoint = tiny_checkpoint(tmp_path / "w8.pt", max_batch=8, seed=1)
    paths = write_synthetic_images(tmp_path / "images", 5, seed=11)
    report = enqueue_folder(client, queue_name, tmp_path / "images", job_size=2)

    batches = run_worker(redis_url, queue_name, checkpoint, tmp_path / "worker.log")

    assert sum(b["batch_size"] for b in batches) == 5 and batches[0]["engine"].startswith("torch:cpu")
    store = QueueStore(client, queue_name)
    with TorchEngine(checkpoint) as engine:
        pixels = np.stack([decode_image(p, SMALL_SIZE, SMALL_SIZE).pixels for p in paths])
        direct = infer(engine, pixels)
    for image_id, expected in zip(report.image_ids, direct, strict=True):
        np.testing.assert_array_equal(store.load_mask(image_id), expected)


def test_unreadable_and_vanished_jobs_do_not_stop_the_worker(tmp_path, client, redis_url, queue_name, small_engine):
    write_synthetic_images(tmp_path / "images", 4)
    queue = segmentation_queue(client, queue_name)
    garbled = queue.enqueue_call("worker.jobs.segment_images", args=[["x"]])
    client.hset(garbled.key, "data", b"\x00 not json")  # job data rq cannot deserialize
    client.rpush(queue.key, "no-such-job")  # a job id whose hash is gone
    good = enqueue_folder(client, queue_name, tmp_path / "images", job_size=2)

    run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log")

    assert Job.fetch(garbled.id, connection=client, serializer=JSONSerializer).get_status() == JobStatus.FAILED
    assert client.llen(queue.intermediate_queue_key) == 0  # nothing left stranded
    for job_id in good.job_ids:
        assert Job.fetch(job_id, connection=client, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    assert QueueStore(client, queue_name).counts().done == 4


def _log_text(log_file: Path) -> str:
    return log_file.read_text(encoding="utf-8", errors="replace")


def test_jobs_rq_cannot_read_are_recorded_as_failed_with_the_reason(
    tmp_path, client, redis_url, queue_name, small_engine
):
    """A job hash rq cannot load is failed where users look (rq's failed registry, status), not dropped."""
    from producer.status import queue_status

    write_synthetic_images(tmp_path / "images", 6)
    report = enqueue_folder(client, queue_name, tmp_path / "images", job_size=2)
    dated, undecodable, good = report.job_ids
    queue = segmentation_queue(client, queue_name)
    client.hset(Job.key_for(dated), "created_at", "not a date")
    client.hset(Job.key_for(undecodable), "origin", b"\xff\xfe")
    stringly = queue.enqueue_call("worker.jobs.segment_images", args=[["x"]])
    client.delete(stringly.key)
    client.set(stringly.key, "hello")  # the job key holds a string, not a hash
    client.rpush(queue.key, "bad id!", b"\xff\xfeid")  # ids rq refuses to build a Job for

    log_file = tmp_path / "worker.log"
    run_worker(redis_url, queue_name, small_engine, log_file)

    expected = {dated: "created_at='not a date' is not a date", undecodable: r"origin=b'\xff\xfe' is not UTF-8",
                stringly.id: "is a Redis string, not the hash rq keeps jobs in: b'hello'"}
    assert set(expected) <= set(queue.failed_job_registry.get_job_ids())
    for job_id, words in expected.items():
        job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)  # readable again
        assert job.get_status() == JobStatus.FAILED
        reason = job.latest_result().exc_string
        assert reason.startswith("bad job: ") and words in reason, reason
        assert job_id in _log_text(log_file) and "cannot be read by rq" in _log_text(log_file)
    store = QueueStore(client, queue_name)
    assert store.bad_jobs() == {"bad id!": "bad job: rq refuses its id: ValueError: Job ID must only contain "
                                           "letters, numbers, underscores and dashes",
                                r"\xff\xfeid": "bad job: its id is not UTF-8 text"}
    failures = store.failures()  # the unreadable jobs' images: failed with the reason, not queued forever
    bad_images = report.image_ids[:4]
    assert set(failures) == set(bad_images)
    assert all(dated in failures[i] or undecodable in failures[i] for i in bad_images)
    assert all(store.is_done(i) for i in report.image_ids[4:])
    assert Job.fetch(good, connection=client, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    assert client.llen(queue.intermediate_queue_key) == 0 and queue.count == 0
    status = queue_status(client, queue)
    assert status.jobs.failed == 5 and status.jobs.finished == 1
    assert (status.images.queued, status.images.finished, status.images.failed) == (0, 2, 4)


def test_a_job_whose_data_is_garbage_or_a_pickle_fails_with_a_reason(
    tmp_path, client, redis_url, queue_name, small_engine
):
    import pickle

    queue = segmentation_queue(client, queue_name)
    data = {"garbage": b"\x00 not json", "pickle": pickle.dumps(("f", None, [["x"]], {})), "shape": b"[1, 2]"}
    jobs = {}
    for kind, payload in data.items():
        jobs[kind] = queue.enqueue_call("worker.jobs.segment_images", args=[["x"]]).id
        client.hset(Job.key_for(jobs[kind]), "data", payload)

    run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log")

    reasons = {kind: Job.fetch(job_id, connection=client, serializer=JSONSerializer).latest_result().exc_string
               for kind, job_id in jobs.items()}
    assert reasons["garbage"] == ("bad job: its data is not valid JSON (rq's JSON serializer could not read it: "
                                  "JSONDecodeError: Expecting value: line 1 column 1 (char 0)): b'\\x00 not json'")
    assert reasons["pickle"].startswith("bad job: its data looks like a Python pickle, which segqueue never "
                                        "unpickles (jobs are written with rq's JSON serializer): b'\\x80")
    assert reasons["shape"] == ("bad job: its data is JSON but not rq's [function, instance, args, kwargs] "
                                "(ValueError: not enough values to unpack (expected 4, got 2)): b'[1, 2]'")
    assert queue.failed_job_registry.count == 3
