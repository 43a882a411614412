"""RqJobSource's claims against a real redis-server: what a claim reads with its jobs, how many LMOVEs a poll sends."""

from __future__ import annotations

import numpy as np
import redis

from broker.jobs import segmentation_queue
from broker.references import ImageReference
from broker.store import QueueStore, StoredImage, now
from producer.enqueue import Enqueuer
from worker.rq_source import RqJobSource


def source(client: redis.Redis, queue: str) -> RqJobSource:
    return RqJobSource(client, queue, name="ourworker", job_heartbeat_ttl_s=60, maintenance_interval_s=600)


def lmoves(client: redis.Redis) -> int:
    """LMOVE commands the server has run (INFO commandstats)."""
    return int(client.info("commandstats").get("cmdstat_lmove", {}).get("calls", 0))


def test_claims_carry_the_records_of_their_images_enqueued_by_reference(client, queue_name, tmp_path):
    store = QueueStore(client, queue_name)
    refs = [ImageReference(f"ref{i}", f"r{i}.png", f"/data/r{i}.png", f"/masks/r{i}.png", 64, 64, now())
            for i in range(2)]
    store.store_references(refs)
    store.store_images([StoredImage("bytes0", "b0.png", np.zeros((64, 64), np.uint8), 64, 64, now())])
    enqueuer = Enqueuer(client, segmentation_queue(client, queue_name), job_size=2)
    enqueuer.add_ids([("ref0", "r0.png"), ("ref1", "r1.png"), ("bytes0", "b0.png"), ("gone", "g.png")])
    enqueuer.flush()

    ours = source(client, queue_name)
    ours.open()
    by_reference, stored = ours.claim(max_jobs=2, timeout_s=1)
    ours.close()

    assert sorted(by_reference.records) == ["ref0", "ref1"]  # read in the claim's round trip
    assert by_reference.records["ref1"][b"url"] == b"/data/r1.png"
    assert stored.records == {}  # a payload in Redis, or no record at all: read when the batch is fetched


def test_a_poll_of_a_dry_queue_sends_one_lmove_and_the_limit_grows_as_jobs_come(client, queue_name):
    ours = source(client, queue_name)
    ours.open()
    sent = []

    def claim(max_jobs: int) -> int:
        before = lmoves(client)
        claimed = len(ours.claim(max_jobs=max_jobs, timeout_s=0))
        sent.append(lmoves(client) - before)
        return claimed

    def enqueue(jobs: int) -> None:
        enqueuer = Enqueuer(client, segmentation_queue(client, queue_name), job_size=1)
        enqueuer.add_ids([(f"img{len(sent)}-{i}", "a.png") for i in range(jobs)])
        enqueuer.flush()

    assert claim(8) == 0 and claim(8) == 0  # the first poll finds the queue empty: the next sends one LMOVE
    enqueue(20)
    assert [claim(8) for _ in range(5)] == [1, 2, 4, 8, 5]  # twice as many each time all were found
    assert claim(8) == 0 and claim(8) == 0  # after 5 of 8: up to 10 (all 8), then the queue is dry: one
    ours.close()
    assert sent == [8, 1, 1, 2, 4, 8, 8, 8, 1]
