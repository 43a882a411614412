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

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_sigkilled_workers_jobs_are_recovered_ahead_of_the_backlog(tmp_path, redis_url, client, queue_name,
                                                                     small_engine):
    """A worker SIGKILLed holding jobs, with a backlog queued behind them: the rescuer finishes the dead worker's
    jobs first (they go back to the front of the queue), not after the backlog. Order, not timing, is checked.

    The victim is frozen (SIGSTOP) while it holds jobs, the backlog is queued, then it is SIGKILLed; the rescuer
    starts once their leases have lapsed, so its first maintenance re-enqueues them before it claims anything."""
    import json

    from rq.job import Job

    queue = Queue(queue_name, connection=client, serializer=JSONSerializer)
    enqueuer = Enqueuer(client, queue, job_size=2)
    write_synthetic_images(tmp_path / "in", 16)
    common = ["--engine", str(small_engine), "--redis-url", redis_url, "--queue", queue_name,
              "--job-heartbeat-ttl", "5"]
    victim_log = tmp_path / "victim.log"
    victim = subprocess.Popen([sys.executable, "-m", "worker", "run", *common, "--log-file", str(victim_log)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rescuer = None
    try:
        deadline = time.monotonic() + 180
        while not (victim_log.exists() and '"worker_ready"' in victim_log.read_text()):
            assert time.monotonic() < deadline, "the victim never became ready"
            time.sleep(0.05)
        for _ in range(4):
            enqueue_paths(enqueuer, [tmp_path / "in"], SMALL_SIZE, SMALL_SIZE)
        while queue.started_job_registry.count < 3:
            assert time.monotonic() < deadline, "the victim never held 3 jobs at once"
            time.sleep(0.002)
        victim.send_signal(signal.SIGSTOP)
        for _ in range(10):  # the backlog, queued while the victim holds its jobs: 80 jobs
            enqueue_paths(enqueuer, [tmp_path / "in"], SMALL_SIZE, SMALL_SIZE)
        victim.kill()
        victim.wait(timeout=30)
        held = queue.started_job_registry.get_job_ids()
        backlog = queue.get_job_ids()
        assert held and len(backlog) >= 80
        # wait (on the condition itself) until every held lease has lapsed and no maintenance lock is left
        leases_end = max(score for _, score in client.zrange(queue.started_job_registry.key, 0, -1, withscores=True))
        while client.time()[0] <= leases_end + 1 or client.exists(queue.registry_cleaning_key):
            assert time.monotonic() < deadline + 60, "the victim's leases never lapsed"
            time.sleep(0.1)

        rescuer = subprocess.Popen([sys.executable, "-m", "worker", "run", *common, "--log-file",
                                    str(tmp_path / "rescuer.log")], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        store = QueueStore(client, queue_name)
        total = len(enqueuer.report.image_ids)
        deadline = time.monotonic() + 180
        while store.counts().done < total or queue.finished_job_registry.count < len(enqueuer.report.job_ids):
            assert time.monotonic() < deadline, f"only {store.counts().done} of {total} images done"
            time.sleep(0.1)
    finally:
        for process in (victim, rescuer):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    assert rescuer.returncode == 0
    jobs = {job.id: job for job in Job.fetch_many(held + backlog, connection=client, serializer=JSONSerializer)}
    assert all(job.get_status() == "finished" for job in jobs.values())
    finish_order = sorted(jobs, key=lambda job_id: jobs[job_id].ended_at)
    ranks = sorted(finish_order.index(job_id) for job_id in held)
    batch_jobs = 8 // 2  # a batch of 8 images may mix the last recovered jobs with the first of the backlog
    first_end = jobs[finish_order[0]].ended_at
    held_s, all_s = ((max(jobs[j].ended_at for j in ids) - first_end).total_seconds() for ids in (held, finish_order))
    print(f"\n{len(held)} recovered jobs finished at ranks {ranks} of {len(finish_order)}; the last of them "
          f"{held_s:.2f} s after the rescuer's first job, the last of all {all_s:.2f} s after it")
    assert ranks[-1] < len(held) + batch_jobs, json.dumps({"held": len(held), "ranks": ranks})
