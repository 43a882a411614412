"""broker.store without a server: job arguments and meta, image ids, key names, record fields.

QueueStore's operations against a real redis-server: tests/integration/test_store.py.
"""

from __future__ import annotations

import re

import pytest
import redis

from broker.errors import BadJob
from broker.jobs import image_ids_in_meta, job_arguments, job_meta, parse_job_arguments
from broker.store import QueueStore, _original_size, _stored_image, new_image_id


def test_job_arguments_round_trip_and_refuse_anything_else():
    ids = [new_image_id(), new_image_id()]
    assert parse_job_arguments(job_arguments(ids)) == ids
    for bad in (["not-a-list"], [[]], [ids, ids], [[1, 2]], "x", None, [[""]]):
        with pytest.raises(BadJob):
            parse_job_arguments(bad)


def test_job_meta_carries_the_ids_and_damaged_meta_gives_none():
    ids = [new_image_id() for _ in range(3)]
    meta = job_meta(ids)
    assert meta == {"images": 3, "image_ids": ids}
    assert image_ids_in_meta(meta) == ids
    for damaged in (None, "x", [], {}, {"image_ids": "abc"}, {"image_ids": []}, {"image_ids": [1]}):
        assert image_ids_in_meta(damaged) == []


def test_image_ids_are_fresh_32_hex_characters():
    ids = {new_image_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_keys_are_prefixed_by_the_queue_so_queues_never_share_records():
    client = redis.Redis.from_url("redis://127.0.0.1:1/0")  # never connected: key names are computed locally
    a, b = QueueStore(client, "a"), QueueStore(client, "b")
    assert a._image_key("x") == "segq:a:img:x" and a._mask_key("x") == "segq:a:mask:x"
    assert a._image_key("x") != b._image_key("x") and a.bad_jobs_key == "segq:a:bad_jobs"
    assert repr(a) == "QueueStore(queue='a')"


@pytest.mark.parametrize(("fields", "expected"), [
    ((b"90", b"100"), (90, 100)),
    ((None, b"100"), None),
    ((b"90", None), None),
])
def test_original_size_reads_both_fields_or_none(fields, expected):
    assert _original_size(fields) == expected


@pytest.mark.parametrize("fields", [(b"0", b"100"), (b"90", b"-1"), (b"ninety", b"100")])
def test_original_size_refuses_non_positive_or_non_integer_values(fields):
    with pytest.raises(ValueError):
        _original_size(fields)


def test_a_record_missing_its_fields_is_named_not_raised():
    reason = _stored_image("abc", {})
    assert isinstance(reason, str) and "abc" in reason
