"""The commands end to end, as a user runs them: separate processes, a real redis-server, real engines and images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from broker.jobs import segmentation_queue
from broker.store import QueueStore, StoredImage, now
from common.metrics import dice
from engines import DEMO_ONNX
from tests.conftest import SMALL_SIZE, free_port, tiny_unet, write_synthetic_images
from tests.helpers import log_events, wait_until

BIN = Path(sys.executable).parent


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the console scripts (producer, worker, engines) to completion."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env)


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start a console script in the background (stdout/stderr to a pipe)."""
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def queue_state(client, queue_name: str) -> dict:
    """Where a queue's jobs and images are, for failure messages."""
    queue = segmentation_queue(client, queue_name)
    images = QueueStore(client, queue_name).counts()
    return {"queued": queue.count, "intermediate": client.llen(queue.intermediate_queue_key),
            "started": queue.started_job_registry.get_job_ids(), "failed": queue.failed_job_registry.count,
            "finished": queue.finished_job_registry.count, "done_images": images.done,
            "failed_images": images.failed}


def test_enqueue_work_status_collect_with_mixed_inputs(tmp_path, redis_url, queue_name, small_engine, client):
    images = tmp_path / "in"
    write_synthetic_images(tmp_path / "a", 5)
    (images / "plates").mkdir(parents=True)
    (tmp_path / "a").rename(images / "plates" / "a")
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(images / "rgb.jpg")
    tifffile.imwrite(images / "plates" / "deep.tif", (np.arange(90 * 40, dtype=np.uint16) * 17).reshape(90, 40))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    common = ["--redis-url", redis_url, "--queue", queue_name]

    enq = cli("producer", "enqueue", str(images), "--job-size", "3", "--size", str(SMALL_SIZE), *common)
    assert enq.returncode == 1, enq.stderr  # one file rejected
    assert "broken.png" in enq.stdout + enq.stderr
    assert "enqueued 7 images in 3 jobs (2 of them as 4 tiles)" in enq.stdout  # rgb.jpg, deep.tif: 2 tiles each

    status = json.loads(cli("producer", "status", "--json", *common).stdout)
    assert status["images"] == {"queued": 9, "started": 0, "finished": 0, "failed": 0}  # engine inputs
    assert status["jobs"]["queued"] == 3

    log_file = tmp_path / "worker.log"
    work = cli("worker", "run", "--engine", str(small_engine), "--burst", "--log-file", str(log_file), *common)
    assert work.returncode == 0, work.stderr + work.stdout
    assert sum(b["batch_size"] for b in log_events(log_file, "batch")) == 9
    assert log_events(log_file, "worker_started") and log_events(log_file, "worker_stopped")

    status = json.loads(cli("producer", "status", "--json", *common).stdout)
    assert status["images"] == {"queued": 0, "started": 0, "finished": 9, "failed": 0}
    assert status["jobs"] == {"queued": 0, "started": 0, "finished": 3, "failed": 0}

    out = tmp_path / "masks"
    got = cli("producer", "collect", "--out", str(out), *common)
    assert got.returncode == 0, got.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["plates/a/img_000.png", "plates/a/img_001.png", "plates/a/img_002.png", "plates/a/img_003.png",
                       "plates/a/img_004.png", "plates/deep.png", "rgb.png"]
    assert Image.open(out / "rgb.png").size == (70, 50)  # original size, (width, height)
    assert Image.open(out / "plates" / "deep.png").size == (40, 90)
    assert set(np.unique(np.asarray(Image.open(out / "plates/a/img_000.png")))) <= {0, 255}


@pytest.mark.slow  # full size: the 512 px demo engine
def test_embedded_redis_full_size_demo_engine(tmp_path):
    """No --redis-url, no REDIS_URL: the embedded server is started and shared; the demo engine at 512 px."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["SEGQUEUE_STATE_DIR"] = str(tmp_path / "state")
    paths = write_synthetic_images(tmp_path / "in", 8, size=512, seed=123)
    try:
        enq = cli("producer", "enqueue", str(tmp_path / "in"), env=env)
        assert enq.returncode == 0, enq.stderr
        work = cli("worker", "run", "--engine", str(DEMO_ONNX), "--burst", env=env)
        assert work.returncode == 0, work.stderr
        got = cli("producer", "collect", "--out", str(tmp_path / "out"), env=env)
        assert got.returncode == 0, got.stderr
    finally:
        pid_file = tmp_path / "state" / "redis.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    assert (tmp_path / "state" / "appendonlydir").exists() or (tmp_path / "state" / "appendonly.aof").exists()
    scores = []
    for path in paths:
        predicted = np.asarray(Image.open(tmp_path / "out" / path.name)) > 127
        truth = np.asarray(Image.open(tmp_path / "in_truth" / path.name)) > 127
        scores.append(dice(predicted, truth))
    assert np.mean(scores) >= 0.85, scores


def test_unreachable_redis_gives_a_clear_message_without_the_password(tmp_path):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    for args in (["producer", "status"], ["producer", "enqueue", str(tmp_path)],
                 ["worker", "run", "--engine", str(DEMO_ONNX)]):
        result = cli(*args, "--redis-url", url)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "cannot reach Redis" in result.stderr
        assert "hunter2" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


@pytest.fixture
def backlog(tmp_path, client, queue_name):
    """120 jobs of 2 images (128 px) on the queue: enough work to stop or kill a worker in the middle."""
    from producer.enqueue import Enqueuer, enqueue_paths

    write_synthetic_images(tmp_path / "in", 12, size=128)
    enqueuer = Enqueuer(client, segmentation_queue(client, queue_name), job_size=2)
    for _ in range(20):
        enqueue_paths(enqueuer, [tmp_path / "in"], 128, 128)
    return enqueuer.report


@pytest.fixture(scope="session")
def engine_128(tmp_path_factory):
    from toolchain.export import export_onnx

    path = tmp_path_factory.mktemp("engine128") / "unet_w16_128.onnx"
    export_onnx(tiny_unet(width=16), path, height=128, width=128, max_batch=8)
    return path


def test_sigterm_finishes_claimed_work_and_exits_zero(tmp_path, redis_url, queue_name, client, backlog, engine_128):
    log_file = tmp_path / "worker.log"
    proc = start("worker", "run", "--engine", str(engine_128), "--log-file", str(log_file),
                 "--redis-url", redis_url, "--queue", queue_name)
    wait_until(lambda: len(log_events(log_file, "batch")) >= 2, 120, "two batches")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stdout.read()

    queue = segmentation_queue(client, queue_name)
    assert queue.started_job_registry.count == 0  # nothing left half-done
    assert queue.count > 0  # it stopped early: the rest is still queued
    finished = queue.finished_job_registry.get_job_ids()
    store = QueueStore(client, queue_name)
    for job in Job.fetch_many(finished, connection=client, serializer=JSONSerializer):
        assert all(store.is_done(i) for i in job.args[0])
    assert log_events(log_file, "worker_stopped")


def test_sigkill_mid_batch_loses_nothing(tmp_path, redis_url, queue_name, client, backlog, engine_128):
    common = ["--engine", str(engine_128), "--redis-url", redis_url, "--queue", queue_name,
              "--job-heartbeat-ttl", "5", "--maintenance-interval", "2"]
    first_log = tmp_path / "first.log"
    victim = start("worker", "run", *common, "--log-file", str(first_log))
    wait_until(lambda: len(log_events(first_log, "batch")) >= 2, 120, "two batches")
    victim.kill()
    victim.wait(timeout=30)
    queue = segmentation_queue(client, queue_name)
    assert queue.started_job_registry.count > 0  # the kill left claimed, unfinished jobs behind

    rescuer = start("worker", "run", *common, "--log-file", str(tmp_path / "second.log"))
    store = QueueStore(client, queue_name)
    total = len(backlog.image_ids)
    try:
        wait_until(lambda: store.counts().done == total
                   and queue.finished_job_registry.count == len(backlog.job_ids), 150,
                   lambda: f"every image to get a mask: {queue_state(client, queue_name)}")
    finally:
        rescuer.send_signal(signal.SIGTERM)
        assert rescuer.wait(timeout=60) == 0
    assert queue.finished_job_registry.count == len(backlog.job_ids)
    assert queue.failed_job_registry.count == 0
    assert store.record_counts()[1] == total
    for job_id in backlog.job_ids:
        assert Job.fetch(job_id, connection=client, serializer=JSONSerializer).get_status() == JobStatus.FINISHED


def test_default_settings_recover_a_sigkilled_workers_jobs_within_15_s(tmp_path, redis_url, queue_name, client,
                                                                        engine_128):
    """Two warm workers with the default lease settings; one is SIGKILLed holding claimed jobs; the other finishes
    them within 15 s of the kill (they go back to the front of the queue: the backlog's size does not count),
    then everything else, and every image has exactly one mask.

    The rescuer is paused (SIGSTOP) while the victim claims, so that the victim surely holds jobs when it dies."""
    from broker.jobs import JOB_RETRIES
    from producer.enqueue import Enqueuer, enqueue_paths

    common = ["--engine", str(engine_128), "--redis-url", redis_url, "--queue", queue_name]
    victim_log, rescuer_log = tmp_path / "victim.log", tmp_path / "rescuer.log"
    victim = start("worker", "run", *common, "--log-file", str(victim_log))
    rescuer = start("worker", "run", *common, "--log-file", str(rescuer_log))
    queue = segmentation_queue(client, queue_name)
    store = QueueStore(client, queue_name)
    try:
        wait_until(lambda: log_events(victim_log, "worker_ready") and log_events(rescuer_log, "worker_ready"), 120,
                   "both workers to be ready")
        rescuer.send_signal(signal.SIGSTOP)
        write_synthetic_images(tmp_path / "in", 12, size=128)
        enqueuer = Enqueuer(client, queue, job_size=2)
        for _ in range(8):
            enqueue_paths(enqueuer, [tmp_path / "in"], 128, 128)
        total, jobs = len(enqueuer.report.image_ids), len(enqueuer.report.job_ids)
        wait_until(lambda: log_events(victim_log, "batch") and queue.started_job_registry.count > 0, 60,
                   "the victim to hold claimed jobs")
        victim.kill()
        killed_at = now()
        held, queued = queue.started_job_registry.get_job_ids(), queue.count
        rescuer.send_signal(signal.SIGCONT)
        victim.wait(timeout=30)
        wait_until(lambda: store.counts().done == total and queue.finished_job_registry.count == jobs, 180,
                   lambda: f"every image to get a mask: {queue_state(client, queue_name)}")
    finally:
        if victim.poll() is None:
            victim.kill()
        rescuer.send_signal(signal.SIGCONT)
        rescuer.send_signal(signal.SIGTERM)
        assert rescuer.wait(timeout=60) == 0
    held_jobs = [job for job in Job.fetch_many(held, connection=client, serializer=JSONSerializer) if job is not None]
    retried = [job for job in held_jobs if job.retries_left is not None and job.retries_left < JOB_RETRIES]
    assert held and retried, f"the victim's jobs {held} should have been recovered through rq's retry"
    recovered_s = max(job.ended_at.timestamp() for job in held_jobs) - killed_at  # rq's end time of the last of them
    print(f"\nthe victim's {len(held)} jobs finished {recovered_s:.1f} s after the kill ({queued} jobs queued at it)")
    assert recovered_s < 15, f"recovery took {recovered_s:.1f} s"
    assert store.record_counts()[1] == total  # exactly one mask per image
    assert queue.failed_job_registry.count == 0


def test_enqueue_out_writes_masks_as_collect_does_and_frees_them(tmp_path, redis_url, queue_name, small_engine, client):
    write_synthetic_images(tmp_path / "in", 5, seed=9)
    streamed = ["--redis-url", redis_url, "--queue", queue_name]
    collected = ["--redis-url", redis_url, "--queue", queue_name + "c"]
    workers = [start("worker", "run", "--engine", str(small_engine), *common) for common in (streamed, collected)]
    try:
        enq = cli("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), "--job-size", "2",
                  "--out", str(tmp_path / "streamed"), "--timeout", "120", *streamed)
        assert enq.returncode == 0, enq.stderr
        assert "wrote 5 masks; 0 failed" in enq.stdout
        assert QueueStore(client, queue_name).record_counts() == (0, 0)  # freed as they were written
        assert cli("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), "--job-size", "2",
                   *collected).returncode == 0
        wait_until(lambda: QueueStore(client, queue_name + "c").counts().done == 5, 120, "5 masks")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    got = cli("producer", "collect", "--out", str(tmp_path / "collected"), *collected)
    assert got.returncode == 0, got.stderr
    for name in (f"img_{i:03d}.png" for i in range(5)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "streamed" / name)),
                                      np.asarray(Image.open(tmp_path / "collected" / name)))


def test_enqueue_wait_needs_out(tmp_path, redis_url):
    result = cli("producer", "enqueue", str(tmp_path), "--wait", "--redis-url", redis_url)
    assert result.returncode == 2 and "--wait needs --out" in result.stderr


def test_redis_restart_mid_run_loses_nothing(tmp_path, queue_name, engine_128):
    """Redis killed (SIGKILL) and restarted from its AOF while a worker runs: every image still gets its mask."""
    import redis as redis_client

    from broker.server import RedisServer
    from producer.enqueue import Enqueuer, enqueue_paths

    server = RedisServer(data_dir=tmp_path / "redis", port=free_port()).start()
    client = redis_client.Redis.from_url(server.url)
    try:
        write_synthetic_images(tmp_path / "in", 12, size=128)
        enqueuer = Enqueuer(client, segmentation_queue(client, queue_name), job_size=2)
        for _ in range(10):
            enqueue_paths(enqueuer, [tmp_path / "in"], 128, 128)
        total = len(enqueuer.report.image_ids)
        time.sleep(1.5)  # appendfsync everysec: let the enqueue reach the AOF
        log_file = tmp_path / "worker.log"
        worker = start("worker", "run", "--engine", str(engine_128), "--redis-url", server.url, "--queue", queue_name,
                       "--job-heartbeat-ttl", "5", "--maintenance-interval", "2", "--log-file", str(log_file))
        wait_until(lambda: len(log_events(log_file, "batch")) >= 2, 120, "two batches")
        server.kill()
        time.sleep(1.0)
        server.start()
        store = QueueStore(client, queue_name)
        queue = segmentation_queue(client, queue_name)
        try:
            jobs = len(enqueuer.report.job_ids)
            wait_until(lambda: store.counts().done == total and queue.finished_job_registry.count == jobs, 150,
                       lambda: f"every image to get a mask after the restart: {queue_state(client, queue_name)}")
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0, worker.stdout.read()
        assert log_events(log_file, "redis_unavailable")  # the worker saw the outage and rode it out
        assert queue.failed_job_registry.count == 0
        assert store.record_counts()[1] == total
        assert queue.finished_job_registry.count == len(enqueuer.report.job_ids)
    finally:
        client.close()
        server.stop()


def test_collect_delete_frees_redis_and_keeps_failures(tmp_path, redis_url, queue_name, small_engine, client):
    write_synthetic_images(tmp_path / "in", 3)
    common = ["--redis-url", redis_url, "--queue", queue_name]
    assert cli("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), *common).returncode == 0
    store = QueueStore(client, queue_name)
    missing = "f" * 32  # an image that failed: it must survive --delete
    store.store_images([StoredImage(missing, "lost.png", np.zeros((SMALL_SIZE, SMALL_SIZE), np.uint8), 9, 9, now())])
    store.save_results([], [(missing, "image lost.png could not be read")])
    assert cli("worker", "run", "--engine", str(small_engine), "--burst", *common).returncode == 0

    first = cli("producer", "collect", "--out", str(tmp_path / "out"), "--delete", *common)
    assert first.returncode == 1 and "lost.png" in first.stderr  # the failure is still reported
    assert "wrote 3 masks" in first.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    assert store.record_counts() == (1, 0)  # only the failed image's record is left
    assert list(store.manifest()) == [missing] and store.counts().done == 0

    again = cli("producer", "collect", "--out", str(tmp_path / "again"), *common)
    assert "wrote 0 masks; 1 failed" in again.stdout
