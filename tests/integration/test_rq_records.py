"""The adapter's batched claim and completion leave Redis exactly as rq's own worker does, record for record.

Two identical jobs go through two workers on the same queue: one through RqJobSource (batched,
merged commands), one through rq's own steps (prepare_execution, prepare_job_execution,
handle_job_success). After the start and after the completion, every rq key of each is compared
in shape: the key names, their types, whether they expire, hash field names, the members of sets,
sorted sets and lists, and the fields of stream entries (ids, dates and worker names normalized);
and the job hash fields whose value the completion changes. The adapter writes the worker's counters
(successful jobs, working time) with its next heartbeat rather than with each completion: the finished
records are compared after one.
"""

from __future__ import annotations

import re

import redis
from rq.executions import prepare_execution
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker

from broker.jobs import segmentation_queue
from producer.enqueue import Enqueuer
from worker.job_source import ImageOutcome
from worker.rq_source import RqJobSource

HEX = re.compile(r"[0-9a-f]{32}")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _norm(text: bytes | str, names: dict[str, str]) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    for real, placeholder in names.items():
        text = text.replace(real, placeholder)
    return HEX.sub("<exec>", UUID.sub("<job>", text))


def shape(client: redis.Redis, job_id: str, worker_name: str, queue: str) -> dict[str, object]:
    """Every rq key that concerns this job or this worker, in a comparable shape."""
    names = {job_id: "<job>", worker_name: "<worker>"}
    keys = [k.decode() for k in client.keys("rq:*")]
    mine = [k for k in keys
            if job_id in k or f":{worker_name}" in k or k.startswith((f"rq:wip:{queue}", f"rq:finished:{queue}"))]
    described: dict[str, object] = {}
    for key in sorted(mine):
        kind = client.type(key).decode()
        ttl = client.ttl(key)
        shared = job_id not in key and f":{worker_name}" not in key  # a queue's registry: only this job's members

        def members(values) -> list[str]:  # this job's members, and those that name no job at all
            return sorted(_norm(m, names) for m in values if job_id in m.decode() or not UUID.search(m.decode()))

        if kind == "hash":
            fields = client.hgetall(key)
            value: object = [*sorted(_norm(f, names) for f in fields),
                             f"status={_norm(fields.get(b'status', b''), names)}"]
        elif kind == "zset":
            value = members(client.zrange(key, 0, -1))
        elif kind == "set":
            value = members(client.smembers(key))
        elif kind == "list":
            value = members(client.lrange(key, 0, -1))
        elif kind == "stream":
            value = [sorted(_norm(f, names) for f in fields) for _, fields in client.xrange(key)]
        else:
            value = None
        if shared and not value:
            continue  # a queue's registry that holds nothing of this job
        described[_norm(key, names)] = (kind, "expires" if ttl > 0 else "persists", value)
    return described


def changed_fields(before: dict[bytes, bytes], after: dict[bytes, bytes]) -> list[str]:
    """Names of the hash fields whose value differs between two HGETALLs (added or removed ones too)."""
    return sorted(name.decode() for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def _enqueue_one_job(client: redis.Redis, queue: str, tag: str) -> str:
    enqueuer = Enqueuer(client, segmentation_queue(client, queue), job_size=2)
    enqueuer.add_ids([(f"{tag}-a", "a.png"), (f"{tag}-b", "b.png")])
    enqueuer.flush()
    return enqueuer.report.job_ids[-1]


def test_batched_claim_and_completion_write_what_rqs_own_worker_writes(client, queue_name):
    queue = segmentation_queue(client, queue_name)

    # rq's own worker: claim, start, succeed
    ref_job_id = _enqueue_one_job(client, queue_name, "ref")
    ref = SimpleWorker([queue], connection=client, serializer=JSONSerializer, name="refworker")
    ref.bootstrap(logging_level="WARNING")
    job, _ = ref.dequeue_job_and_maintain_ttl(timeout=1)
    assert job.id == ref_job_id
    execution = prepare_execution(ref, job)
    ref.prepare_job_execution(job, remove_from_intermediate_queue=True)
    ref_started = shape(client, ref_job_id, "refworker", queue_name)
    ref_hash = client.hgetall(f"rq:job:{ref_job_id}")
    job._result = {"images": []}
    job.ended_at = now()
    ref.handle_job_success(job, queue, queue.started_job_registry, execution)
    ref_finished = shape(client, ref_job_id, "refworker", queue_name)
    ref_changed = changed_fields(ref_hash, client.hgetall(f"rq:job:{ref_job_id}"))

    # the adapter, three jobs at once (the compared one among them)
    ours = RqJobSource(client, queue_name, name="ourworker", job_heartbeat_ttl_s=60, maintenance_interval_s=600)
    ours.open()
    job_ids = [_enqueue_one_job(client, queue_name, f"ours{i}") for i in range(3)]
    claims = ours.claim(max_jobs=3, timeout_s=1)
    assert [c.job_id for c in claims] == job_ids
    our_started = shape(client, job_ids[1], "ourworker", queue_name)
    our_hash = client.hgetall(f"rq:job:{job_ids[1]}")
    for claim in claims:
        for image_id in claim.image_ids:
            claim.outcomes[image_id] = ImageOutcome(image_id, True, "a.png")
    ours.complete(claims)
    counted_before_heartbeat = client.hget("rq:worker:ourworker", "successful_job_count")
    ours.keep_alive([])  # the worker's counters go with its next heartbeat
    our_finished = shape(client, job_ids[1], "ourworker", queue_name)
    our_changed = changed_fields(our_hash, client.hgetall(f"rq:job:{job_ids[1]}"))
    ref.teardown()
    ours.close()

    assert our_started == ref_started
    # rq re-saves the whole job hash on success; only these fields change value, and the adapter writes just them
    assert ref_changed == our_changed == ["ended_at", "status"]
    assert our_finished == ref_finished
    assert counted_before_heartbeat is None and client.hget("rq:worker:ourworker", "successful_job_count") == b"3"
    assert any(key.startswith("rq:results:") for key in our_finished)  # the comparison saw the result stream
    assert our_finished[f"rq:finished:{queue_name}"] == ("zset", "persists", ["<job>"])
    assert our_finished["rq:job:<job>"][2][-1] == "status=finished"
    assert our_started["rq:executions:<job>"] == ("zset", "expires", ["<exec>"])

