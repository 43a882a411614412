"""QueueStore against a real redis-server: every operation, the stored sizes, and records in an older format."""

from __future__ import annotations

import numpy as np
import pytest
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from broker.jobs import segmentation_queue
from broker.payloads import OldFormat
from broker.store import QueueStore, StoredImage, StoredMask, new_image_id, now
from producer.collect import collect_masks
from tests.conftest import SMALL_SIZE, write_synthetic_images
from tests.integration.test_worker import enqueue_folder, run_worker
from toolchain.synth import generate


def stored(image_id: str, pixels: np.ndarray, name: str | None = None) -> StoredImage:
    return StoredImage(image_id, name or f"{image_id}.png", pixels, 100, 80, now())


def write_old_format_image(client, store: QueueStore, image_id: str, pixels: np.ndarray, name: str) -> None:
    """An image record as segqueue wrote it before payloads were encoded: raw `pixels`, no format tag."""
    client.hset(store._image_key(image_id), mapping={
        "pixels": pixels.tobytes(), "height": pixels.shape[0], "width": pixels.shape[1],
        "original_height": pixels.shape[0], "original_width": pixels.shape[1], "name": name,
        "enqueued_at": repr(now())})
    client.hset(store._manifest, image_id, name)


def stored_bytes(store: QueueStore, image_id: str) -> dict[str, int]:
    """Redis's MEMORY USAGE of the image's and the mask's hashes (0 for a missing one), in bytes."""
    pipe = store.client.pipeline(transaction=False)
    pipe.memory_usage(store._image_key(image_id), samples=0)
    pipe.memory_usage(store._mask_key(image_id), samples=0)
    image, mask = pipe.execute()
    return {"image": image or 0, "mask": mask or 0}


def test_store_load_save_collect_forget(client, queue_name, tmp_path):
    store = QueueStore(client, queue_name)
    rng = np.random.default_rng(0)
    images = [stored(new_image_id(), rng.integers(0, 256, (48, 40), dtype=np.uint8)) for _ in range(3)]
    store.store_images(images)

    assert store.manifest() == {i.image_id: i.name for i in images}
    assert store.counts().total == 3
    loaded = store.load_images([images[0].image_id, "missing", images[2].image_id])
    np.testing.assert_array_equal(loaded[0].pixels, images[0].pixels)
    assert (loaded[0].original_height, loaded[0].original_width, loaded[0].name) == (100, 80, images[0].name)
    assert isinstance(loaded[1], str) and "missing" in loaded[1] and "not in Redis" in loaded[1]
    np.testing.assert_array_equal(loaded[2].pixels, images[2].pixels)

    assert store.resolved([i.image_id for i in images]) == [False, False, False]
    masks = [(images[0].image_id, (images[0].pixels > 127).astype(np.uint8)),
             (images[1].image_id, (images[1].pixels % 3).astype(np.uint8))]  # 3 classes
    store.save_results([], [(images[1].image_id, "first try failed")])
    assert store.failures() == {images[1].image_id: "first try failed"}
    store.save_results(masks, [(images[2].image_id, "bad pixels")])
    assert store.resolved([i.image_id for i in images]) == [True, True, True]
    assert store.outcomes([i.image_id for i in images] + ["unknown"]) == [
        (True, None), (True, None), (False, "bad pixels"), (False, None)]  # one SMISMEMBER, one HMGET
    assert store.outcomes([]) == []
    assert store.failures() == {images[2].image_id: "bad pixels"}  # a mask clears an earlier failure
    assert store.counts() == type(store.counts())(total=3, done=2, failed=1)
    assert store.is_done(images[0].image_id) and not store.is_done(images[2].image_id)
    for image_id, mask in masks:
        np.testing.assert_array_equal(store.load_mask(image_id), mask)
    assert store.load_mask(images[2].image_id) is None
    result, pending = store.load_results([images[0].image_id, images[2].image_id])
    assert result.original_size == (100, 80) and result.error is None
    np.testing.assert_array_equal(result.mask, masks[0][1])
    assert pending.mask is None and pending.error is None
    assert store.load_results([images[1].image_id])[0].original_size == (100, 80)
    assert store.record_counts() == (3, 2)

    assert store.still_stored([images[0].image_id, "gone"]) == [True, False]
    store.forget([images[0].image_id])
    assert store.record_counts() == (2, 1)
    assert store.still_stored([images[0].image_id, images[1].image_id]) == [False, True]
    assert images[0].image_id not in store.manifest() and not store.is_done(images[0].image_id)
    assert store.load_results([images[0].image_id]) == [StoredMask(None, None)]  # no mask, no size, no error
    other = QueueStore(client, queue_name + "x")  # queues are separate
    assert other.counts().total == 0 and other.load_mask(images[1].image_id) is None


def test_full_size_image_and_mask_take_well_under_the_raw_512_kb(client, queue_name):
    """Redis's own MEMORY USAGE of a 512x512 image record and its 2-class mask (raw: 2 x 256 KB)."""
    store = QueueStore(client, queue_name)
    pairs = list(generate(4, size=512, seed=21))
    images = [stored(new_image_id(), image) for image, _ in pairs]
    store.store_images(images)
    store.save_results([(image.image_id, mask) for image, (_, mask) in zip(images, pairs, strict=True)])
    usage = [stored_bytes(store, image.image_id) for image in images]
    per_image = sum(u["image"] + u["mask"] for u in usage) / len(usage)
    print(f"stored bytes per 512x512 image + mask: {per_image:.0f} ({usage})")
    assert all(u["mask"] < 16 * 1024 for u in usage)  # a packed, compressed 0/1 mask: a few KB
    assert all(u["image"] < 230 * 1024 for u in usage)  # noisy synthetic pixels still compress
    assert per_image < 0.5 * 512 * 1024


def test_old_format_image_fails_alone_in_the_worker(tmp_path, client, redis_url, queue_name, small_engine):
    write_synthetic_images(tmp_path / "images", 3)
    store = QueueStore(client, queue_name)
    good = enqueue_folder(client, queue_name, tmp_path / "images", job_size=3)
    old_id = new_image_id()
    write_old_format_image(client, store, old_id, np.zeros((SMALL_SIZE, SMALL_SIZE), np.uint8), "old.png")
    new_id = new_image_id()
    store.store_images([stored(new_id, np.zeros((SMALL_SIZE, SMALL_SIZE), np.uint8))])
    mixed = segmentation_queue(client, queue_name).enqueue_call(
        "worker.jobs.segment_images", args=[[old_id, new_id]], meta={"images": 2})

    run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log")

    assert all(store.load_mask(i) is not None for i in good.image_ids)
    assert store.load_mask(new_id) is not None and store.load_mask(old_id) is None
    reason = store.failures()[old_id]
    assert old_id in reason and "older segqueue version" in reason and "enqueue the image again" in reason
    job = Job.fetch(mixed.id, connection=client, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED
    assert [r["ok"] for r in job.return_value()["images"]] == [False, True]


def test_collect_reports_an_old_format_mask_and_writes_the_others(
    tmp_path, client, redis_url, queue_name, small_engine
):
    write_synthetic_images(tmp_path / "images", 3)
    report = enqueue_folder(client, queue_name, tmp_path / "images", job_size=3)
    run_worker(redis_url, queue_name, small_engine, tmp_path / "worker.log")
    store = QueueStore(client, queue_name)
    victim = report.image_ids[1]
    # the mask record as an older worker wrote it: raw bytes under `mask`, no format tag
    client.delete(store._mask_key(victim))
    client.hset(store._mask_key(victim), mapping={"mask": b"\1" * SMALL_SIZE * SMALL_SIZE,
                                                   "height": SMALL_SIZE, "width": SMALL_SIZE})
    with pytest.raises(OldFormat, match=victim):
        store.load_mask(victim)

    collected = collect_masks(store, tmp_path / "masks", delete=True)

    assert sorted(p.name for p in collected.written) == ["img_000.png", "img_002.png"]
    assert list(collected.failed) == ["img_001.png"]
    assert "older segqueue version" in collected.failed["img_001.png"] and victim in collected.failed["img_001.png"]
    assert list(store.manifest()) == [victim]  # the unreadable one is kept, the written ones are forgotten


def test_a_malformed_original_size_is_an_error_naming_the_image_not_an_exception(client, queue_name):
    store = QueueStore(client, queue_name)
    images = [stored(new_image_id(), np.zeros((8, 8), np.uint8)) for _ in range(4)]
    store.store_images(images)
    store.save_results([(i.image_id, np.ones((8, 8), np.uint8)) for i in images])
    for image, height in zip(images, (-3, 0, "abc"), strict=False):  # the fourth image keeps its size
        client.hset(store._image_key(image.image_id), "original_height", height)

    results = store.load_results([i.image_id for i in images])

    for image, result, height in zip(images, results, ("-3", "0", "abc"), strict=False):
        assert result.mask is None and result.original_size is None
        assert result.error == (f"image {image.image_id} is malformed in Redis: original size (height, width) "
                                f"[b'{height}', b'80'] is not two positive integers")
    assert results[3].error is None and results[3].original_size == (100, 80)


def test_bad_jobs_are_kept_with_their_reason(client, queue_name):
    store = QueueStore(client, queue_name)
    store.record_bad_job("bad id!", "bad job: rq refuses its id")
    assert store.bad_jobs() == {"bad id!": "bad job: rq refuses its id"} and store.bad_job_count() == 1
    assert store.bad_jobs_key == f"segq:{queue_name}:bad_jobs"


def test_reference_records_read_ahead_are_used_as_read_and_others_are_read_when_loaded(client, queue_name, tmp_path):
    from broker.references import ImageReference

    store = QueueStore(client, queue_name)
    paths = write_synthetic_images(tmp_path / "images", 2)
    refs = [ImageReference(new_image_id(), path.name, str(path), str(tmp_path / "masks" / path.name), SMALL_SIZE,
                           SMALL_SIZE, now()) for path in paths]
    store.store_references(refs)
    in_redis = stored(new_image_id(), np.zeros((SMALL_SIZE, SMALL_SIZE), np.uint8))
    store.store_images([in_redis])
    wrong_type = new_image_id()
    client.set(store._image_key(wrong_type), "not a hash")
    ids = [refs[0].image_id, in_redis.image_id, "missing", wrong_type, refs[1].image_id]

    pipe = client.pipeline()  # a transaction, as the worker's claims read them
    reads = store.read_references(pipe, ids)
    records = reads(pipe.execute(raise_on_error=False))

    assert set(records) == {refs[0].image_id, refs[1].image_id}  # only references: never a payload, nor an error
    with_records, without = store.load_images(ids, records), store.load_images(ids)
    for ahead, read in zip(with_records, without, strict=True):
        if isinstance(read, str):
            assert ahead == read  # the same reason: the missing and the WRONGTYPE keys are read when loaded
        else:
            assert (ahead.name, ahead.mask_url, ahead.original_height) == (read.name, read.mask_url,
                                                                          read.original_height)
            np.testing.assert_array_equal(ahead.pixels, read.pixels)
    # records read ahead are not read again: gone from Redis, they still load
    store.forget([ref.image_id for ref in refs], masks=False)
    assert [image.name for image in store.load_images([refs[1].image_id], records)] == [paths[1].name]
    assert "not in Redis" in store.load_images([refs[1].image_id])[0]
