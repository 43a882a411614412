"""Recovery from what a dead worker leaves behind, with a real Redis and a real worker process.

rq's own maintenance takes a 899 s lock and recovers a job stuck on the intermediate list only after a
minute; a worker SIGKILLed while cleaning (the soak benchmark did it) left the lock behind and stopped
recovery on its queue for 15 minutes. The adapter's maintenance (worker/rq_source.py) uses a 30 s lock
and a 5 s threshold: these tests leave exactly that state in Redis and time the recovery.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from rq import Queue
from rq.serializers import JSONSerializer

from broker.store import QueueStore
from producer.enqueue import Enqueuer, enqueue_paths
from tests.conftest import SMALL_SIZE, write_synthetic_images

ROOT = Path(__file__).resolve().parents[1]


def test_a_stale_rq_maintenance_lock_and_a_job_stuck_mid_claim_are_recovered_within_15_s(
        tmp_path, redis_url, client, queue_name, small_engine):
    queue = Queue(queue_name, connection=client, serializer=JSONSerializer)
    write_synthetic_images(tmp_path / "in", 8)
    report = enqueue_paths(Enqueuer(client, queue, job_size=4), [tmp_path / "in"], SMALL_SIZE, SMALL_SIZE)
    assert len(report.job_ids) == 2
    # what a worker SIGKILLed at the worst moment leaves: rq's maintenance lock (899 s, as rq sets it) and a
    # job moved to the intermediate list but never started
    client.set(queue.registry_cleaning_key, 1, ex=899)
    stuck = client.lmove(queue.key, queue.intermediate_queue_key).decode()
    assert stuck == report.job_ids[0]

    started = time.monotonic()
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run", "--engine", str(small_engine),
                               "--redis-url", redis_url, "--queue", queue_name],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = QueueStore(client, queue_name)
    try:
        deadline = started + 60
        while store.counts().done < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        recovered_s = time.monotonic() - started
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    assert store.counts().done == 8, f"only {store.counts().done} of 8 images done after 60 s"
    assert recovered_s < 15, f"recovery took {recovered_s:.1f} s"  # including the worker's start
    assert queue.fetch_job(stuck).get_status() == "finished"
    assert client.llen(queue.intermediate_queue_key) == 0
