"""The worker's pipeline and writer with an in-memory job source (tests/integration/fake_jobs.py).

Images, masks, Redis and the engine are real (the width-8 ONNX fixture, 64x64); only the job queue
seam is replaced, so these tests pin the pipeline's own logic: batching across jobs, per-image
failures, whole-batch failures, stop requests, heartbeats, and one completion per job.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from broker.connection import BrokerSettings
from broker.store import QueueStore, StoredImage, new_image_id, now
from engines.loader import load_engine
from tests.conftest import SMALL_SIZE
from tests.integration.fake_jobs import FakeJobSource
from toolchain.synth import generate
from worker.batch import BatchItem, FetchedBatch
from worker.claims import OpenClaims
from worker.loader import ImageLoader, ProcessImageLoader
from worker.logs import configure_logging
from worker.pipeline import BatchPipeline
from worker.settings import WorkerSettings
from worker.signals import StopFlag
from worker.writer import ComputedBatch, ResultWriter


def store_images(client: redis.Redis, queue: str, count: int) -> list[str]:
    """Store `count` synthetic 64x64 images on `queue`; their ids."""
    images = [StoredImage(new_image_id(), f"img{i}.png", pixels, 100, 90, now())
              for i, (pixels, _) in enumerate(generate(count, size=SMALL_SIZE, seed=11))]
    QueueStore(client, queue).store_images(images)
    return [image.image_id for image in images]


def stored_mask(client: redis.Redis, queue: str, image_id: str) -> np.ndarray | None:
    return QueueStore(client, queue).load_mask(image_id)


def make_pipeline(tmp_path: Path, redis_url: str, queue: str, engine, source: FakeJobSource,
                  stop: StopFlag | None = None, loader: ImageLoader | None = None, **overrides) -> BatchPipeline:
    options = {"burst": True, **overrides}
    settings = WorkerSettings(broker=BrokerSettings(redis_url=redis_url, queue=queue), engine_path=Path("-"),
                              log_file=tmp_path / "worker.log", **options)
    log = configure_logging(settings.log_file).bind(worker=source.name, engine=engine.name)
    return BatchPipeline(settings, engine, source, redis.Redis.from_url(redis_url), log, stop or StopFlag(),
                         loader=loader)


def batch_sizes(tmp_path: Path) -> list[int]:
    lines = (tmp_path / "worker.log").read_text().splitlines()
    return [r["batch_size"] for r in map(json.loads, lines) if r["event"] == "batch"]


@pytest.fixture
def engine(small_engine):
    loaded = load_engine(small_engine)
    yield loaded
    loaded.close()


def test_images_are_batched_across_jobs_and_each_job_completes_once(tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 15)
    source = FakeJobSource([ids[i:i + 3] for i in range(0, 15, 3)])

    done = make_pipeline(tmp_path, redis_url, queue_name, engine, source, max_wait_ms=500).run()

    assert done == 15
    assert batch_sizes(tmp_path) == [8, 7]
    assert sorted(c.job_id for c in source.completed) == [f"job{i}" for i in range(5)]
    assert not source.failed
    for claim in source.completed:
        assert [o["ok"] for o in claim.result()["images"]] == [True] * 3
    assert all(stored_mask(client, queue_name, i) is not None for i in ids)


def test_a_missing_image_fails_alone_and_its_job_still_finishes(tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 3)
    missing = new_image_id()
    source = FakeJobSource([[ids[0], missing, ids[1]], [ids[2]]])

    assert make_pipeline(tmp_path, redis_url, queue_name, engine, source).run() == 3

    first = next(c for c in source.completed if c.job_id == "job0")
    outcomes = first.result()["images"]
    assert [o["ok"] for o in outcomes] == [True, False, True]
    assert missing in outcomes[1]["error"] and "not in Redis" in outcomes[1]["error"]
    assert stored_mask(client, queue_name, missing) is None


def test_a_job_whose_every_image_failed_is_completed_with_its_reasons(tmp_path, client, redis_url, queue_name, engine):
    gone = [new_image_id(), new_image_id()]
    source = FakeJobSource([gone])

    assert make_pipeline(tmp_path, redis_url, queue_name, engine, source).run() == 0

    [claim] = source.completed
    assert not claim.any_ok
    assert claim.failure_reason().startswith("every image of this job failed: image ")


def test_an_engine_failure_fails_every_job_of_the_batch_for_retry(
    tmp_path, client, redis_url, queue_name, small_engine
):
    ids = store_images(client, queue_name, 4)
    broken = load_engine(small_engine)
    broken.close()  # a real engine that can no longer run
    source = FakeJobSource([ids[:2], ids[2:]])

    assert make_pipeline(tmp_path, redis_url, queue_name, broken, source).run() == 0

    assert sorted(c.job_id for c, _, _ in source.failed) == ["job0", "job1"]
    assert all(retry and "engine" in reason for _, reason, retry in source.failed)
    assert not source.completed


def test_a_stop_request_finishes_the_claimed_work_and_claims_no_more(tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 12)
    stop = StopFlag()
    source = FakeJobSource([ids[:4], ids[4:8], ids[8:]], on_claim=lambda claims: stop.request())

    # one batch of prefetch: the first claim takes the jobs of one batch (8 images), not the third job
    done = make_pipeline(tmp_path, redis_url, queue_name, engine, source, stop=stop, burst=False,
                         prefetch_batches=1).run()

    claimed = {i for c in source.claimed for i in c.image_ids}
    assert done == len(claimed) and 0 < len(claimed) < 12
    assert sorted(c.job_id for c in source.completed) == sorted(c.job_id for c in source.claimed)


def test_the_fetch_window_is_twice_the_decode_processes_so_a_claim_never_leaves_one_idle(
        tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 80)
    source = FakeJobSource([ids[start:start + 4] for start in range(0, 80, 4)])
    loader = ProcessImageLoader(BrokerSettings(redis_url=redis_url, queue=queue_name), processes=3)
    try:
        pipeline = make_pipeline(tmp_path, redis_url, queue_name, engine, source, loader=loader, max_batch=8,
                                 prefetch_batches=2)
        assert pipeline.fetch_window == 6
        done = pipeline.run()
    finally:
        loader.close()

    assert done == 80 and len(source.completed) == 20
    # a window of 6 batches, not prefetch_batches' 2: claims come when at most 3 batches are still fetching (one
    # per decode process) and ask for the other 3 or more at once, less the images already waiting (whole jobs,
    # under a batch): at least 20 images, 5 jobs of 4 (the first, before a job is seen, counts 8 images a job)
    sizes = [size for size in source.claim_sizes if size]
    assert sum(sizes) == 20 and all(size >= 5 for size in sizes[:-1]), sizes
    assert max(sizes) <= 12  # never more than the whole window: 6 batches of 8 images


def test_jobs_are_claimed_for_the_whole_prefetch_window_at_once(tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 80)
    source = FakeJobSource([ids[start:start + 4] for start in range(0, 80, 4)])

    done = make_pipeline(tmp_path, redis_url, queue_name, engine, source, max_batch=8, prefetch_batches=4).run()

    assert done == 80 and len(source.completed) == 20
    # the window is 4 batches of 8 images; once half of it is free, one claim fills it: 2 batches or more, less
    # the images already waiting (whole jobs, under a batch), so at least 12 images, 3 jobs of 4 (the first claim,
    # before a job is seen, counts 8 images a job: 4 jobs); one claim per batch would make 10
    sizes = [size for size in source.claim_sizes if size]
    assert sum(sizes) == 20 and all(size >= 3 for size in sizes[:-1]), sizes
    assert max(sizes) <= 8  # never more than the whole window


def test_jobs_are_claimed_ahead_on_the_claim_thread_and_held_open_at_once(
        tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 40)
    threads: list[str] = []
    held: list[bool] = []

    def on_claim(claims) -> None:  # runs inside the claim, before it returns
        threads.append(threading.current_thread().name)

    source = FakeJobSource([ids[start:start + 4] for start in range(0, 40, 4)], on_claim=on_claim)
    pipeline = make_pipeline(tmp_path, redis_url, queue_name, engine, source, max_batch=8, prefetch_batches=2)
    claim_held = pipeline._claim_held

    def spy(max_jobs: int, timeout_s: float = 0.0):  # what a claim returns is already open (heartbeated)
        claims = claim_held(max_jobs, timeout_s)
        open_ids = {claim.job_id for claim in pipeline.claims.snapshot()}
        held.extend(claim.job_id in open_ids for claim in claims)
        return claims

    pipeline._claim_held = spy  # type: ignore[method-assign]
    assert pipeline.run() == 40 and len(source.completed) == 10
    assert threads[0].startswith("claim"), threads  # the first claim: the main loop had nothing to wait for yet
    assert held and all(held)


def test_the_main_loop_computes_on_while_the_writer_is_stuck_up_to_its_depth(
        tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 80)
    source = FakeJobSource([ids[start:start + 8] for start in range(0, 80, 8)])
    source.complete_gate = threading.Event()  # the first write hangs (a Redis stall) until the gate opens
    source.gate_timeout_s = 120.0
    pipeline = make_pipeline(tmp_path, redis_url, queue_name, engine, source)  # the default writer depth
    done: list[int] = []
    runner = threading.Thread(target=lambda: done.append(pipeline.run()))
    runner.start()
    handed_over = pipeline.writer._queue.queue  # the writer's queue; None closes it when the loop is done
    try:
        assert source.completing.wait(30)
        deadline = time.monotonic() + 60
        while not (handed_over and handed_over[-1] is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        # all 10 batches computed and handed over while the first write hung: with the old depth of 4 the
        # loop waits for the writer instead
        assert handed_over and handed_over[-1] is None
    finally:
        source.complete_gate.set()
        runner.join(60)
    assert done == [80] and len(source.completed) == 10


def wait_until_main_thread_in(*functions: str, timeout_s: float = 30.0) -> None:
    """Return once the main thread's stack holds every one of these functions (or after timeout_s)."""
    main, deadline = threading.main_thread().ident, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame, names = sys._current_frames().get(main or 0), set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        if set(functions) <= names:
            return
        time.sleep(0.001)


def test_each_batch_line_says_where_the_main_thread_waited(tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 8)
    # the claim (on the claim thread) lasts 0.2 s more once the main thread waits for it, with nothing else to
    # do: that wait goes on the batch it submits next
    source = FakeJobSource([ids], on_claim=lambda claims: (wait_until_main_thread_in("_take_claims", "result"),
                                                          time.sleep(0.2)))

    assert make_pipeline(tmp_path, redis_url, queue_name, engine, source).run() == 8

    [line] = [r for r in map(json.loads, (tmp_path / "worker.log").read_text().splitlines()) if r["event"] == "batch"]
    assert line["claim_ms"] >= 200
    waits = [line[key] for key in ("claim_ms", "handover_ms", "fetch_wait_ms", "engine_wait_ms")]
    assert all(wait >= 0 for wait in waits)
    assert line["engine_wait_ms"] <= line["compute_ms"]  # asked for after the submit, got by the finish
    assert line["fetch_wait_ms"] + line["engine_wait_ms"] <= line["total_ms"]


class CompletesAfterAHeartbeat(FakeJobSource):
    """Completions wait (up to 10 s) until a heartbeat has seen an open job: on a busy machine the whole run
    can otherwise end between two heartbeats, and the test would depend on scheduling."""

    def __init__(self, jobs: list[list[str]]) -> None:
        super().__init__(jobs)
        self.complete_gate = threading.Event()

    def keep_alive(self, claims) -> None:
        super().keep_alive(claims)
        if self.kept_alive[-1]:
            self.complete_gate.set()


def test_open_jobs_are_heartbeated_and_closed_ones_are_not(tmp_path, client, redis_url, queue_name, engine):
    ids = store_images(client, queue_name, 16)
    source = CompletesAfterAHeartbeat([[i] for i in ids])

    make_pipeline(tmp_path, redis_url, queue_name, engine, source, heartbeat_interval_s=0.0).run()

    assert source.kept_alive and source.maintained
    completed = {c.job_id for c in source.completed}
    assert completed == {f"job{i}" for i in range(16)}
    assert any(source.kept_alive)  # open jobs were heartbeated ...
    assert source.heartbeats_after_completion == []  # ... and none after it was completed


# --- the writer alone ------------------------------------------------------------------------


def computed(items: list[BatchItem], client: redis.Redis, queue: str) -> ComputedBatch:
    images = QueueStore(client, queue).load_images([item.image_id for item in items])
    submitted = FetchedBatch(items=items, images=images, rejected=[], taken_at=time.monotonic(),
                             fetch_ms=0.0, image_wait_ms=[0.0] * len(items))
    masks = np.stack([(image.pixels > 128).astype(np.uint8) for image in images])
    return ComputedBatch(submitted, masks, compute_ms=1.0)


def make_writer(client, queue: str, source: FakeJobSource, claims: OpenClaims, tmp_path: Path) -> ResultWriter:
    log = configure_logging(tmp_path / "writer.log")
    return ResultWriter(QueueStore(client, queue), source, claims, log, time.monotonic)


def test_the_writer_completes_a_job_spanning_two_batches_once_after_the_second(tmp_path, client, queue_name):
    ids = store_images(client, queue_name, 4)
    source = FakeJobSource([ids[:1], ids[1:4]])
    claims = OpenClaims()
    first, spanning = source.claim(2, 0)
    for claim in (first, spanning):
        claims.add(claim)
    writer = make_writer(client, queue_name, source, claims, tmp_path)

    writer.put(computed([BatchItem(first, ids[0]), BatchItem(spanning, ids[1])], client, queue_name))
    assert source.completing.wait(10)  # the first batch is written before the second is handed over
    writer.put(computed([BatchItem(spanning, ids[2]), BatchItem(spanning, ids[3])], client, queue_name))
    writer.close()

    assert [c.job_id for c in source.completed] == ["job0", "job1"]
    assert source.completion_sizes == [1, 1] and len(claims) == 0
    assert writer.images_done == 4
    expected = (next(generate(4, size=SMALL_SIZE, seed=11))[0] > 128).astype(np.uint8)
    assert np.array_equal(stored_mask(client, queue_name, ids[0]), expected)


def test_batches_waiting_behind_a_write_go_to_redis_together_and_each_logs_its_line(tmp_path, client, queue_name):
    ids = store_images(client, queue_name, 3)
    source = FakeJobSource([[image_id] for image_id in ids])
    claims = OpenClaims()
    first, second, third = source.claim(3, 0)
    for claim in (first, second, third):
        claims.add(claim)
    source.complete_gate = threading.Event()
    writer = make_writer(client, queue_name, source, claims, tmp_path)

    writer.put(computed([BatchItem(first, ids[0])], client, queue_name))
    assert source.completing.wait(10)  # the first batch's completion is under way (held at the gate)
    writer.put(computed([BatchItem(second, ids[1])], client, queue_name))
    writer.put(computed([BatchItem(third, ids[2])], client, queue_name))
    source.complete_gate.set()
    writer.close()

    assert source.completion_sizes == [1, 2]  # the two batches that waited: one completion call, one round trip
    assert [c.job_id for c in source.completed] == ["job0", "job1", "job2"] and len(claims) == 0
    assert all(stored_mask(client, queue_name, image_id) is not None for image_id in ids)
    lines = [json.loads(line) for line in (tmp_path / "writer.log").read_text().splitlines()]
    assert [(r["job_ids"], r["jobs_completed"]) for r in lines if r["event"] == "batch"] == [
        (["job0"], 1), (["job1"], 1), (["job2"], 1)]


def test_the_writer_survives_a_failed_completion_and_abandons_those_jobs(tmp_path, client, queue_name):
    ids = store_images(client, queue_name, 2)
    source = FakeJobSource([ids[:1], ids[1:]])
    claims = OpenClaims()
    first, second = source.claim(2, 0)
    claims.add(first)
    claims.add(second)
    writer = make_writer(client, queue_name, source, claims, tmp_path)

    source.fail_completions_with = redis.ConnectionError("connection reset")
    writer.put(computed([BatchItem(first, ids[0])], client, queue_name))
    deadline = time.monotonic() + 10
    while not first.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    source.fail_completions_with = None
    writer.put(computed([BatchItem(second, ids[1])], client, queue_name))
    writer.close()

    assert first.closed and first not in source.completed  # left to the queue's retry
    assert [c.job_id for c in source.completed] == ["job1"]
