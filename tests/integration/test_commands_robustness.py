"""The commands as separate processes (`python -m producer|worker`) against malformed records, a second
stop signal and a SIGKILLed worker: real redis-server, real engines, real images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import Worker

from broker.jobs import segmentation_queue
from broker.store import QueueStore
from engines import DEMO_ONNX
from producer.status import WORKER_ALIVE_WITHIN_S, queue_status
from tests.conftest import SMALL_SIZE, write_synthetic_images
from tests.helpers import log_events, wait_until


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <package> ...` to completion."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def start_module(*args: str) -> subprocess.Popen:
    """`python -m <package> ...` in the background (stdout and stderr to one pipe)."""
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def failure_lines(stderr: str) -> dict[str, str]:
    """collect's `failed: NAME: REASON` lines, as name -> reason."""
    lines = [line.removeprefix("failed: ") for line in stderr.splitlines() if line.startswith("failed: ")]
    return dict(line.split(": ", 1) for line in lines)


def test_collect_lists_malformed_records_and_refused_names_and_writes_the_rest(tmp_path, redis_url, queue_name,
                                                                               small_engine, client):
    write_synthetic_images(tmp_path / "in", 8)
    common = ["--redis-url", redis_url, "--queue", queue_name]
    assert run_module("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), *common).returncode == 0
    assert run_module("worker", "run", "--engine", str(small_engine), "--burst", *common).returncode == 0
    store = QueueStore(client, queue_name)
    ids = {name: image_id for image_id, name in store.manifest().items()}
    outside = tmp_path / "abs" / "evil.png"
    malformed = [{"original_height": -3}, {"original_height": 0}, {"original_height": "abc"},
                 {"original_height": 10**6, "original_width": 10**6}]
    for index, fields in enumerate(malformed):
        client.hset(store._image_key(ids[f"img_{index:03d}.png"]), mapping=fields)
    client.hset(store._manifest, mapping={ids["img_004.png"]: "../escape.png", ids["img_005.png"]: str(outside)})

    for workers in ("1", "2"):  # inline, and on the process pool
        out = tmp_path / f"out{workers}"
        got = run_module("producer", "collect", "--out", str(out), "--workers", workers, *common)

        assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
        assert "wrote 2 masks; 6 failed; 0 not done yet" in got.stdout
        failed = failure_lines(got.stderr)
        assert set(failed) == {"img_000.png", "img_001.png", "img_002.png", "img_003.png", "../escape.png",
                               str(outside)}
        for name, size in (("img_000.png", "b'-3'"), ("img_001.png", "b'0'"), ("img_002.png", "b'abc'")):
            assert failed[name] == (f"image {ids[name]} is malformed in Redis: original size (height, width) "
                                    f"[{size}, b'{SMALL_SIZE}'] is not two positive integers")
        assert failed["img_003.png"] == ("its stored original size 1000000x1000000 is over the 67108864-pixel limit "
                                         "that enqueue enforces: the record is malformed")
        assert failed["../escape.png"] == f"refusing to write outside {out}: ../escape.png"
        assert failed[str(outside)] == f"refusing to write outside {out}: {outside}"
        assert sorted(p.name for p in out.rglob("*.png")) == ["img_006.png", "img_007.png"]
    assert not outside.parent.exists() and not (tmp_path / "escape.png").exists()


@pytest.mark.slow  # full size: the 512 px demo engine
def test_a_second_sigterm_exits_at_once_without_waiting_for_the_batches_in_flight(tmp_path, redis_url, queue_name,
                                                                                    client):
    """The demo engine at 512 px takes over a second per batch of 8 on a 2-core CPU, and the engine has two
    batches queued: a worker that waited for them after the second signal took 4 s to exit. Exiting at
    once still leaves the kernel tearing the process down: 0.15 to 0.55 s on the loaded 2-core machine."""
    write_synthetic_images(tmp_path / "in", 48, size=512)
    common = ["--redis-url", redis_url, "--queue", queue_name]
    assert run_module("producer", "enqueue", str(tmp_path / "in"), "--job-size", "2", *common).returncode == 0
    log_file = tmp_path / "worker.log"
    worker = start_module("worker", "run", "--engine", str(DEMO_ONNX), "--log-file", str(log_file), *common)
    try:
        wait_until(lambda: len(log_events(log_file, "batch")) >= 1, 180, "a first batch")
        worker.send_signal(signal.SIGTERM)  # finish the claimed work ...
        seen = len(log_events(log_file, "batch"))
        wait_until(lambda: len(log_events(log_file, "batch")) > seen, 60, "a batch of the drain")
        worker.send_signal(signal.SIGTERM)  # ... no: stop now, with the next batch on the engine
        signalled = time.monotonic()
        status = worker.wait(timeout=60)
        exited_s = time.monotonic() - signalled
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = worker.stdout.read()
    print(f"exited {exited_s:.3f} s after the second SIGTERM")
    assert exited_s < 1.5, f"exited {exited_s:.2f} s after the second SIGTERM (status {status})"
    assert status == 128 + signal.SIGTERM, output
    assert "worker: second SIGTERM: exiting now" in output
    assert not log_events(log_file, "worker_stopped")
    assert QueueStore(client, queue_name).counts().done < 48  # it did not drain


def test_status_stops_counting_a_sigkilled_worker_after_three_heartbeat_intervals(tmp_path, redis_url, queue_name,
                                                                                  client, small_engine):
    common = ["--redis-url", redis_url, "--queue", queue_name]
    log_file = tmp_path / "worker.log"
    worker = start_module("worker", "run", "--engine", str(small_engine), "--log-file", str(log_file), *common)
    queue = segmentation_queue(client, queue_name)
    try:
        wait_until(lambda: log_events(log_file, "worker_ready"), 120, "the worker to be ready")
        assert json.loads(run_module("producer", "status", "--json", *common).stdout)["workers"] == 1
    finally:
        worker.kill()
        worker.wait(timeout=30)
    killed = time.monotonic()

    wait_until(lambda: queue_status(client, queue).workers == 0, WORKER_ALIVE_WITHIN_S + 10,
               "producer status to stop counting the killed worker")
    gone_s = time.monotonic() - killed
    assert Worker.count(queue=queue) == 1  # rq still lists it: its record lives until its TTL runs out
    assert json.loads(run_module("producer", "status", "--json", *common).stdout)["workers"] == 0
    print(f"counted as gone {gone_s:.1f} s after the kill")


def _enqueued_jobs(client, queue_name: str) -> list[tuple[str, list[str]]]:
    """(job id, image ids) of every queued job, in queue order."""
    queue = segmentation_queue(client, queue_name)
    return [(job.id, job.args[0]) for job in queue.get_jobs()]


def test_an_image_key_holding_a_string_fails_that_image_alone_in_the_worker_and_in_collect(
        tmp_path, redis_url, queue_name, small_engine, client):
    """A poison pill once: the batch fetch got WRONGTYPE, the worker exited 1 with a traceback on every claim,
    the good images of its jobs were abandoned, and collect stopped for the whole queue."""
    write_synthetic_images(tmp_path / "in", 6)
    common = ["--redis-url", redis_url, "--queue", queue_name]
    assert run_module("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), "--job-size", "2",
                      *common).returncode == 0
    store = QueueStore(client, queue_name)
    ids = {name: image_id for image_id, name in store.manifest().items()}
    client.delete(store._image_key(ids["img_002.png"]))
    client.set(store._image_key(ids["img_002.png"]), "not an image")

    worker = run_module("worker", "run", "--engine", str(small_engine), "--burst", *common)

    assert worker.returncode == 0 and "Traceback" not in worker.stdout + worker.stderr, worker.stderr
    poisoned = (f"image {ids['img_002.png']}: its key {store._image_key(ids['img_002.png'])} holds a Redis string, "
                "not an image record (WRONGTYPE)")
    assert store.failures() == {ids["img_002.png"]: poisoned}
    assert all(store.is_done(image_id) for name, image_id in ids.items() if name != "img_002.png")
    status = json.loads(run_module("producer", "status", "--json", *common).stdout)
    assert status["images"] == {"queued": 0, "started": 0, "finished": 5, "failed": 1}
    assert status["jobs"]["finished"] == 3 and status["jobs"]["failed"] == 0  # img_003.png's job finished too
    # a mask key holding a string is the same poison for collect
    client.delete(store._mask_key(ids["img_004.png"]))
    client.set(store._mask_key(ids["img_004.png"]), "not a mask")

    for workers in ("1", "2"):  # inline, and on the process pool
        out = tmp_path / f"out{workers}"
        got = run_module("producer", "collect", "--out", str(out), "--workers", workers, *common)

        assert got.returncode == 1 and "Traceback" not in got.stderr and "collect stopped" not in got.stderr, got.stderr
        assert "wrote 4 masks; 2 failed; 0 not done yet" in got.stdout
        assert failure_lines(got.stderr) == {
            "img_002.png": poisoned,
            "img_004.png": (f"image {ids['img_004.png']}: its key {store._mask_key(ids['img_004.png'])} holds a "
                            "Redis string, not a mask record (WRONGTYPE)")}
        assert sorted(p.name for p in out.rglob("*.png")) == ["img_000.png", "img_001.png", "img_003.png",
                                                               "img_005.png"]


def test_the_images_of_a_job_whose_data_is_not_json_fail_with_its_reason_and_collect_lists_them(
        tmp_path, redis_url, queue_name, small_engine, client):
    """They stayed `queued` forever in status, and collect counted them as not done without naming them.
    The third job's record is unreadable as a whole too (a bad date): its images are found the same way."""
    import pickle

    write_synthetic_images(tmp_path / "in", 8)
    common = ["--redis-url", redis_url, "--queue", queue_name]
    assert run_module("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), "--job-size", "2",
                      *common).returncode == 0
    jobs = _enqueued_jobs(client, queue_name)
    (garbled, _), (pickled, _), (undated, _), (_, good_ids) = jobs
    client.hset(Job.key_for(garbled), "data", b"\x00 not json")
    client.hset(Job.key_for(pickled), "data", pickle.dumps(("f", None, [["x"]], {})))
    client.hset(Job.key_for(undated), mapping={"data": b"\x00 not json", "created_at": "not a date"})

    worker = run_module("worker", "run", "--engine", str(small_engine), "--burst", *common)

    assert worker.returncode == 0 and "Traceback" not in worker.stdout + worker.stderr, worker.stderr
    store = QueueStore(client, queue_name)
    reasons = {job_id: Job.fetch(job_id, connection=client, serializer=JSONSerializer).latest_result().exc_string
               for job_id in (garbled, pickled, undated)}
    assert reasons[garbled].startswith("bad job: its data is not valid JSON")
    assert reasons[pickled].startswith("bad job: its data looks like a Python pickle")
    assert reasons[undated].startswith("bad job: rq cannot read its record (created_at='not a date' is not a date")
    expected = {image_id: f"its job {job_id} failed: {reasons[job_id]}"
                for job_id, image_ids in jobs[:3] for image_id in image_ids}
    assert store.failures() == expected
    assert all(store.is_done(image_id) for image_id in good_ids)
    status = json.loads(run_module("producer", "status", "--json", *common).stdout)
    assert status["images"] == {"queued": 0, "started": 0, "finished": 2, "failed": 6}
    assert status["jobs"]["failed"] == 3 and status["jobs"]["finished"] == 1

    got = run_module("producer", "collect", "--out", str(tmp_path / "out"), *common)

    assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
    assert "wrote 2 masks; 6 failed; 0 not done yet" in got.stdout
    names = store.manifest()
    assert failure_lines(got.stderr) == {names[image_id]: reason for image_id, reason in expected.items()}
