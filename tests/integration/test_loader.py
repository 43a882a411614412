"""The worker's decode processes (worker/loader.py) against a real Redis and real worker processes.

They must load exactly what the store loads on a thread, leave no process behind when the worker is
SIGKILLed, and a dead one must stop its worker with a clear reason while its jobs are done by another.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broker.connection import BrokerSettings
from broker.store import QueueStore
from common.images import ImageSource
from producer.pool import store_files
from producer.tiling import RESIZE
from tests.conftest import SMALL_SIZE, free_port, write_synthetic_images
from tests.integration.test_pool import events, wait_until
from toolchain.synth import generate
from worker.loader import LoaderDied, ProcessImageLoader
from worker.settings import default_decode_processes

ROOT = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_decode_processes_load_exactly_what_the_store_loads(tmp_path, client, redis_url, queue_name):
    folder = tmp_path / "images"
    folder.mkdir()
    (small, _), = generate(1, size=SMALL_SIZE, seed=5)
    (large, _), = generate(1, size=SMALL_SIZE * 2, seed=6)
    Image.fromarray(small).save(folder / "as_is.png")  # stored as png
    Image.fromarray(large).save(folder / "large.png")  # decoded and stored as zstd
    store = QueueStore(client, queue_name)
    chunk = store_files(store, [ImageSource(folder / n, n) for n in ("as_is.png", "large.png")], SMALL_SIZE, SMALL_SIZE,
                        RESIZE)  # large.png as one resized record (tiled, it would be 9)
    ids = [image_id for image_id, _ in chunk.stored]
    client.hset(f"segq:{queue_name}:img:{ids[0]}x", mapping={"format": "segq-image/1", "codec": "png", "height": 1,
                                                             "width": 1, "data": b"\x89PNG\r\n\x1a\n broken"})
    asked = ids + [ids[0] + "x", "missing"]
    loader = ProcessImageLoader(BrokerSettings(redis_url=redis_url, queue=queue_name), processes=2)
    try:
        in_processes = loader.load(asked)
    finally:
        loader.close()
    on_thread = store.load_images(asked)
    assert [type(x) for x in in_processes] == [type(x) for x in on_thread]
    for got, expected in zip(in_processes[:2], on_thread[:2], strict=True):
        assert (got.image_id, got.name, got.original_height, got.original_width) == \
               (expected.image_id, expected.name, expected.original_height, expected.original_width)
        np.testing.assert_array_equal(got.pixels, expected.pixels)
    np.testing.assert_array_equal(in_processes[0].pixels, small)
    assert in_processes[2] == on_thread[2] and "corrupt" in in_processes[2]
    assert in_processes[3] == on_thread[3] and "not in Redis" in in_processes[3]


def test_decode_processes_that_cannot_reach_redis_stop_the_loader_at_start():
    nobody = BrokerSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", queue="unused")
    with pytest.raises(LoaderDied, match="could not start"):
        ProcessImageLoader(nobody, processes=2)


def test_no_decode_process_outlives_a_sigkilled_worker(redis_url, queue_name):
    script = ("import sys, time\n"
              "from broker.connection import BrokerSettings\n"
              "from worker.loader import ProcessImageLoader\n"
              f"loader = ProcessImageLoader(BrokerSettings(redis_url={redis_url!r}, queue={queue_name!r}), 3)\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        children = children_of(parent.pid)
        assert len(children) == 3
        parent.kill()
        parent.wait(timeout=30)
        wait_until(lambda: not any(alive(pid) for pid in children), 10, "the decode processes to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in children_of(parent.pid):
            os.kill(pid, signal.SIGKILL)


def start_worker(small_engine: Path, redis_url: str, queue_name: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run", "--engine", str(small_engine), "--device", "cpu",
         "--log-file", str(log), "--job-heartbeat-ttl", "5", "--redis-url", redis_url, "--queue", queue_name],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_dead_decode_process_stops_its_worker_and_another_does_the_jobs(tmp_path, client, redis_url, queue_name,
                                                                          small_engine):
    victim_log, rescuer_log = tmp_path / "victim.log", tmp_path / "rescuer.log"
    victim = start_worker(small_engine, redis_url, queue_name, victim_log)
    rescuer = None
    try:
        wait_until(lambda: events(victim_log, "worker_ready"), 120, "the worker to be ready", victim)
        decoders = children_of(victim.pid)
        assert len(decoders) == default_decode_processes("cpu")  # the default --decode-processes: 8, or one per core
        os.kill(decoders[0], signal.SIGKILL)
        images = tmp_path / "images"
        write_synthetic_images(images, 16)
        enq = subprocess.run([sys.executable, "-m", "producer", "enqueue", str(images), "--job-size", "2",
                              "--size", str(SMALL_SIZE), "--redis-url", redis_url, "--queue", queue_name],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert enq.returncode == 0, enq.stderr
        output, _ = victim.communicate(timeout=120)
        assert victim.returncode == 1, output
        failed = events(victim_log, "worker_failed")
        assert failed and "decode process died" in failed[0]["reason"]
        assert "Traceback" not in output
        wait_until(lambda: not any(alive(pid) for pid in decoders), 10, "the other decode processes to exit")

        rescuer = start_worker(small_engine, redis_url, queue_name, rescuer_log)
        store = QueueStore(client, queue_name)
        wait_until(lambda: store.counts().done == 16, 120, "all 16 masks from the second worker", rescuer)
        assert store.counts().failed == 0
    finally:
        for process in (victim, rescuer):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
    assert rescuer.returncode == 0
