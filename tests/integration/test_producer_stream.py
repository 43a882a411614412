"""The parallel producer, backpressure and streaming, with real commands, a real Redis and a real worker.

- `producer enqueue --workers 2` (a process pool) stores the same images and enqueues the same jobs as
  one process, and still reports bad files by name;
- `producer enqueue DIR --out MASKS --max-pending N` with a running worker streams 2,000 small images:
  Redis never holds more than N of them (sampled all along), every mask is written exactly once and
  matches the image, and nothing is left in Redis;
- `--max-pending` with nobody collecting gives up with a clear error after --timeout, losing nothing
  already stored.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from broker.store import QueueStore
from tests.conftest import SMALL_SIZE, write_synthetic_images

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def many_images(folder: Path, count: int, distinct: int = 40) -> None:
    """`count` PNGs in folder/a, folder/b: copies of `distinct` synthetic images under distinct names."""
    originals = write_synthetic_images(folder.parent / "originals", distinct)
    for i in range(count):
        target = folder / ("a" if i % 2 else "b") / f"img_{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(originals[i % distinct], target)


class RedisSampler(threading.Thread):
    """Samples the queue's stored images (manifest size) and Redis's used memory every 20 ms."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        super().__init__(daemon=True)
        self.store = QueueStore(client, queue)
        self.client = client
        self.max_images = 0
        self.max_memory = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.max_images = max(self.max_images, self.store.counts().total)
            self.max_memory = max(self.max_memory, int(self.client.info("memory")["used_memory"]))
            self.samples += 1
            time.sleep(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def test_a_pool_of_producers_stores_every_image_and_reports_bad_files(tmp_path, redis_url, client, queue_name):
    write_synthetic_images(tmp_path / "in", 37)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli("producer", "enqueue", str(tmp_path / "in"), "--workers", "2", "--job-size", "4",
                 "--size", str(SMALL_SIZE), "--redis-url", redis_url, "--queue", queue_name)
    assert result.returncode == 1, result.stderr  # one file rejected
    assert "enqueued 37 images in 10 jobs" in result.stdout
    assert "broken.png" in result.stdout + result.stderr
    store = QueueStore(client, queue_name)
    names = store.manifest()
    assert sorted(names.values()) == [f"img_{i:03d}.png" for i in range(37)]
    from broker.jobs import segmentation_queue

    queue = segmentation_queue(client, queue_name)
    jobs = [queue.fetch_job(job_id) for job_id in queue.job_ids]
    assert len(jobs) == 10
    in_jobs = [image_id for job in jobs for image_id in job.args[0]]
    assert sorted(in_jobs) == sorted(names) and len(set(in_jobs)) == 37  # each stored image in exactly one job
    loaded = store.load_images(in_jobs[:3])
    assert all(image.pixels.shape == (SMALL_SIZE, SMALL_SIZE) for image in loaded)


def test_enqueue_out_streams_thousands_through_a_bounded_redis(tmp_path, redis_url, client, queue_name, small_engine):
    count, max_pending = 2000, 96
    many_images(tmp_path / "in", count)
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run", "--engine", str(small_engine),
                               "--redis-url", redis_url, "--queue", queue_name, "--max-wait-ms", "5",
                               "--log-file", str(tmp_path / "worker.log")],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = RedisSampler(redis.Redis.from_url(redis_url), queue_name)
    sampler.start()
    try:
        result = cli("producer", "enqueue", str(tmp_path / "in"), "--out", str(tmp_path / "masks"),
                     "--max-pending", str(max_pending), "--workers", "2", "--size", str(SMALL_SIZE),
                     "--timeout", "300", "--redis-url", redis_url, "--queue", queue_name, timeout=600)
    finally:
        sampler.stop()
        worker.terminate()
        worker.wait(timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"wrote {count} masks; 0 failed; 0 not done yet" in result.stdout
    masks = sorted(p.relative_to(tmp_path / "masks") for p in (tmp_path / "masks").rglob("*.png"))
    assert len(masks) == count and len(set(masks)) == count
    # bounded: never more than max_pending of the run's images held at once (sampled ~every 20 ms)
    assert sampler.samples > 50 and 0 < sampler.max_images <= max_pending
    # nothing left behind in Redis
    store = QueueStore(client, queue_name)
    assert store.counts().total == 0 and store.record_counts() == (0, 0)
    # each mask is its own image's: copies of one original (i and i + 40) got identical masks
    def mask(i: int) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / "masks" / ("a" if i % 2 else "b") / f"img_{i:05d}.png"))

    assert mask(0).shape == (SMALL_SIZE, SMALL_SIZE) and set(np.unique(mask(0))) <= {0, 255}
    for i in (0, 7, 13, 39):
        for j in (i + 40, i + 1000, i + 1960):
            np.testing.assert_array_equal(mask(i), mask(j))


def test_max_pending_with_nobody_collecting_times_out_clearly(tmp_path, redis_url, client, queue_name):
    write_synthetic_images(tmp_path / "in", 12)
    result = cli("producer", "enqueue", str(tmp_path / "in"), "--max-pending", "5", "--timeout", "2",
                 "--workers", "1", "--size", str(SMALL_SIZE), "--redis-url", redis_url, "--queue", queue_name)
    assert result.returncode == 1
    assert "still pending in Redis after 2 s (--max-pending 5)" in result.stderr
    store = QueueStore(client, queue_name)
    stored = store.counts().total
    assert stored == 5  # what was stored before the wait got its jobs: nothing stored is orphaned
    from broker.jobs import segmentation_queue

    queue = segmentation_queue(client, queue_name)
    assert sum(len(queue.fetch_job(job_id).args[0]) for job_id in queue.job_ids) == stored


def test_enqueue_out_into_a_file_fails_each_mask_clearly_and_keeps_them_in_redis(tmp_path, redis_url, client,
                                                                                  queue_name, small_engine):
    write_synthetic_images(tmp_path / "in", 8)
    (tmp_path / "not_a_dir").write_text("a file where the masks folder should be")
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run", "--engine", str(small_engine),
                               "--redis-url", redis_url, "--queue", queue_name],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = cli("producer", "enqueue", str(tmp_path / "in"), "--out", str(tmp_path / "not_a_dir"),
                     "--workers", "1", "--size", str(SMALL_SIZE), "--timeout", "120",
                     "--redis-url", redis_url, "--queue", queue_name)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: img_")]
    assert len(failed) == 8 and all("cannot write" in line and "not_a_dir" in line for line in failed)
    assert "wrote 0 masks; 8 failed" in result.stdout
    store = QueueStore(client, queue_name)
    assert store.counts().total == 8  # nothing written, nothing freed: a later collect still has every mask
    assert store.counts().done == 8


def test_status_after_enqueue_out_counts_collected_images_as_finished(tmp_path, redis_url, client, queue_name,
                                                                     small_engine):
    """`producer enqueue --out` frees each image as its mask file is written; status still counts it finished,
    so jobs and images agree (21 images in 6 jobs of 4)."""
    from broker.jobs import segmentation_queue

    write_synthetic_images(tmp_path / "in", 21)
    common = ["--redis-url", redis_url, "--queue", queue_name]
    enqueue = subprocess.Popen([sys.executable, "-m", "producer", "enqueue", str(tmp_path / "in"), "--out",
                                str(tmp_path / "masks"), "--job-size", "4", "--workers", "1",
                                "--size", str(SMALL_SIZE), "--timeout", "300", *common],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        queue = segmentation_queue(client, queue_name)
        deadline = time.monotonic() + 120
        while queue.count < 6 and enqueue.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue.count == 6, "the producer did not enqueue its 6 jobs"
        worker = cli("worker", "run", "--burst", "--engine", str(small_engine), *common)
        assert worker.returncode == 0, worker.stderr
        stdout, stderr = enqueue.communicate(timeout=300)
    finally:
        if enqueue.poll() is None:
            enqueue.kill()
            enqueue.wait(timeout=60)
    assert enqueue.returncode == 0, stdout + stderr
    assert "wrote 21 masks; 0 failed; 0 not done yet" in stdout
    assert QueueStore(client, queue_name).record_counts() == (0, 0)  # every image freed

    status = json.loads(cli("producer", "status", "--json", *common).stdout)
    assert status["jobs"] == {"queued": 0, "started": 0, "finished": 6, "failed": 0}
    assert status["images"] == {"queued": 0, "started": 0, "finished": 21, "failed": 0}
    assert (status["masks_in_redis"], status["collected"]) == (0, 21)
    table = cli("producer", "status", *common).stdout
    rows = {cells[0]: cells[1:] for cells in map(str.split, table.splitlines())
            if cells[0] in ("jobs", "images") and cells[1].isdigit()}
    assert rows == {"jobs": ["0", "0", "6", "0"], "images": ["0", "0", "21", "0"]}
    assert "images finished: 0 with a mask kept in Redis" in table and ", 21 collected (mask file written" in table


def test_forget_counts_each_collected_image_once(client, queue_name):
    """Only images that were done count as collected, and failed ones as failed_freed, once each, however often
    they are forgotten."""
    from broker.store import StoredImage

    store = QueueStore(client, queue_name)
    pixels = np.zeros((SMALL_SIZE, SMALL_SIZE), np.uint8)
    store.store_images([StoredImage(f"i{n}", f"f{n}.png", pixels, SMALL_SIZE, SMALL_SIZE, 0.0) for n in range(5)])
    store.save_results([("i0", pixels), ("i1", pixels), ("i2", pixels)], [("i3", "bad pixels")])
    store.forget(["i0", "i1", "i3"])  # two done, one failed
    store.forget(["i0", "i1", "nope"])  # again, and an unknown id
    counts = store.counts()
    assert (counts.total, counts.done, counts.failed, counts.collected, counts.failed_freed) == (2, 1, 0, 2, 1)
