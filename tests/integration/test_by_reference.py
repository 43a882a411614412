"""`producer enqueue SOURCE --by-reference --out DEST`, with the real commands, a real Redis and real workers.

Images stay on shared storage: a real local folder (the same path for every process), and `s3://` through
moto's S3-compatible server, started here (it stands in for S3 in tests only). The workers read and decode
the images and write the masks; Redis carries only locations:

- 64 files, one worker: every mask is written by the worker, exactly once, and is the engine's mask of its
  image at the image's size; Redis takes in at most 4 KB per image; a file missing, truncated or unreadable
  when the worker reads it fails alone, with the decoder's reason;
- a worker SIGKILLed while it holds jobs loses nothing: another worker finishes them, rewriting any mask
  the first one wrote (same file, whole);
- the same flow on s3://, with a missing and a truncated object;
- by reference, images are resized, never tiled: `--fit tile` is refused, an image larger than the engine
  input gets the resized mask at its own size, and a multi-page TIFF fails with a reason that says to
  enqueue it without --by-reference.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from broker.jobs import segmentation_queue
from broker.store import QueueStore
from common.images import decode_image, resize_mask
from tests.conftest import SMALL_SIZE, free_port, write_synthetic_images
from tests.helpers import log_events, wait_until

ROOT = Path(__file__).resolve().parents[2]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def expected_masks(engine: Path, images: list[Path]) -> dict[str, np.ndarray]:
    """Each image's mask as `producer collect` would write it (0/255 at the image's size), from the engine itself."""
    from engines.loader import load_engine

    with load_engine(engine) as loaded:
        masks = {}
        for path in images:
            decoded = decode_image(path, SMALL_SIZE, SMALL_SIZE)
            mask = loaded.submit(decoded.pixels[None]).result()[0]
            masks[path.name] = resize_mask(mask, decoded.original_height, decoded.original_width) * 255
    return masks


def enqueued(client, queue: str, images: int) -> bool:
    return QueueStore(client, queue).counts().total >= images and segmentation_queue(client, queue).count > 0


def test_64_files_by_reference_one_worker_masks_written_once_and_bad_files_fail_alone(
        tmp_path, redis_url, client, queue_name, small_engine):
    shared = tmp_path / "shared"
    good = write_synthetic_images(shared / "in", 64)
    for bad in ("missing", "truncated", "unreadable"):
        shutil.copyfile(good[0], shared / "in" / f"{bad}.png")
    common = ["--redis-url", redis_url, "--queue", queue_name]
    net_in_before = int(client.info("stats")["total_net_input_bytes"])

    producer = start("producer", "enqueue", str(shared / "in"), "--by-reference", "--out", str(shared / "masks"),
                     "--size", str(SMALL_SIZE), "--job-size", "8", *common)
    wait_until(lambda: enqueued(client, queue_name, 67), 120, "the 67 references enqueued", producer)
    # what the worker meets: one file gone, one cut in half, one that cannot be read as a file
    (shared / "in" / "missing.png").unlink()
    data = (shared / "in" / "truncated.png").read_bytes()
    (shared / "in" / "truncated.png").write_bytes(data[:len(data) // 2])
    (shared / "in" / "unreadable.png").unlink()
    (shared / "in" / "unreadable.png").mkdir()

    log = tmp_path / "worker.log"
    worker = start("worker", "run", "--engine", str(small_engine), "--burst", "--log-file", str(log), *common)
    assert finish(worker)[0] == 0
    code, output = finish(producer)
    net_in = int(client.info("stats")["total_net_input_bytes"]) - net_in_before

    assert code == 1, output  # three images failed
    assert "wrote 64 masks; 3 failed; 0 not done yet" in output, output
    failed = {line.split(": ", 2)[1]: line for line in output.splitlines() if line.startswith("failed: ")}
    assert set(failed) == {"missing.png", "truncated.png", "unreadable.png"}, output
    assert "no such file or directory" in failed["missing.png"].lower()
    assert "truncated" in failed["truncated.png"]
    assert "Is a directory" in failed["unreadable.png"]

    masks = sorted((shared / "masks").rglob("*"))
    assert [p.name for p in masks] == [p.name for p in good]  # no temporary file left, no mask for a bad file
    expected = expected_masks(small_engine, good)
    for path in masks:
        assert np.array_equal(np.asarray(Image.open(path)), expected[path.name]), path.name
    batches = log_events(log, "batch")
    assert sum(batch["images_ok"] for batch in batches) == 64  # each mask written once
    assert sum(batch["images_failed"] for batch in batches) == 3
    store = QueueStore(client, queue_name)
    assert store.record_counts() == (3, 0)  # the finished images were freed; no mask ever went into Redis
    assert store.counts().collected == 64
    print(f"\nRedis took in {net_in / 67:.0f} bytes per image")
    assert net_in <= 4096 * 67, f"Redis took in {net_in / 67:.0f} bytes per image"


def test_a_sigkilled_worker_loses_nothing_by_reference(tmp_path, redis_url, client, queue_name, small_engine):
    shared = tmp_path / "shared"
    good = write_synthetic_images(shared / "in", 64)
    common = ["--redis-url", redis_url, "--queue", queue_name]
    producer = start("producer", "enqueue", str(shared / "in"), "--by-reference", "--out", str(shared / "masks"),
                     "--size", str(SMALL_SIZE), "--job-size", "2", *common)
    wait_until(lambda: enqueued(client, queue_name, 64), 120, "the references enqueued", producer)
    queue = segmentation_queue(client, queue_name)
    victim_log = tmp_path / "victim.log"
    victim = start("worker", "run", "--engine", str(small_engine), "--job-heartbeat-ttl", "5", "--log-file",
                   str(victim_log), *common)
    wait_until(lambda: queue.started_job_registry.count >= 3, 120, "the victim holding 3 jobs", victim)
    victim.send_signal(signal.SIGSTOP)
    held = queue.started_job_registry.get_job_ids()
    victim.kill()
    victim.wait(timeout=30)
    done_by_victim = sum(batch["images_ok"] for batch in log_events(victim_log, "batch"))
    assert done_by_victim < 64 and held

    # not --burst: it must stay until the victim's leases lapse and its maintenance re-enqueues the held jobs
    rescuer = start("worker", "run", "--engine", str(small_engine), "--job-heartbeat-ttl", "5", *common)
    try:
        code, output = finish(producer)
    finally:
        rescuer.send_signal(signal.SIGTERM)
        assert finish(rescuer, 60)[0] == 0
    assert code == 0, output
    assert "wrote 64 masks; 0 failed; 0 not done yet" in output, output
    assert all(queue.fetch_job(job_id).get_status() == "finished" for job_id in held)
    masks = sorted((shared / "masks").rglob("*.png"))
    assert [p.name for p in masks] == [p.name for p in good]
    expected = expected_masks(small_engine, good)
    for path in masks:
        assert np.array_equal(np.asarray(Image.open(path)), expected[path.name]), path.name


@pytest.fixture
def s3_server(tmp_path) -> dict[str, str]:
    """moto's S3-compatible server on a free port (a stand-in for S3, tests only); env for fsspec/s3fs to use it."""
    pytest.importorskip("s3fs")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import socket

        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 60, "moto's S3 server to listen")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_by_reference_on_s3_reads_images_and_writes_masks_there(tmp_path, redis_url, client, queue_name,
                                                                 small_engine, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("segq-test")
    good = write_synthetic_images(tmp_path / "in", 12)
    for path in good:
        fs.put_file(str(path), f"segq-test/images/sub/{path.name}")
    data = good[0].read_bytes()
    fs.pipe_file("segq-test/images/truncated.png", data[:len(data) // 2])
    fs.pipe_file("segq-test/images/missing.png", data)
    fs.pipe_file("segq-test/images/notes.txt", b"not an image")
    common = ["--redis-url", redis_url, "--queue", queue_name]
    producer = start("producer", "enqueue", "s3://segq-test/images", "--by-reference", "--out", "s3://segq-test/masks",
                     "--size", str(SMALL_SIZE), *common, env=s3_server)
    wait_until(lambda: enqueued(client, queue_name, 14), 120, "the references enqueued", producer)
    fs.rm("segq-test/images/missing.png")
    worker = start("worker", "run", "--engine", str(small_engine), "--burst", *common, env=s3_server)
    assert finish(worker)[0] == 0
    code, output = finish(producer)

    assert code == 1, output
    assert "rejected: s3://segq-test/images/notes.txt: unsupported file type '.txt'" in output, output
    assert "wrote 12 masks; 2 failed; 0 not done yet" in output, output
    assert "failed: missing.png: s3://segq-test/images/missing.png: no such file or directory" in output, output
    assert "failed: truncated.png: s3://segq-test/images/truncated.png: corrupt or truncated PNG" in output, output
    fs.invalidate_cache()
    written = sorted(fs.find("segq-test/masks"))
    assert written == [f"segq-test/masks/sub/{path.name}" for path in good]
    expected = expected_masks(small_engine, good)
    for key in written:
        with fs.open(key, "rb") as handle:
            assert np.array_equal(np.asarray(Image.open(handle)), expected[key.rsplit("/", 1)[1]]), key


def test_by_reference_images_are_resized_tiling_refused_and_a_stack_fails(tmp_path, redis_url, client, queue_name,
                                                                          small_engine):
    shared = tmp_path / "shared"
    common = ["--redis-url", redis_url, "--queue", queue_name]
    large = write_synthetic_images(shared / "in", 1, size=3 * SMALL_SIZE)[0]
    stack = np.stack([np.asarray(Image.open(large))] * 3)
    tifffile.imwrite(shared / "in" / "stack.tif", stack, photometric="minisblack", metadata=None)
    out = ["--out", str(shared / "masks"), "--size", str(SMALL_SIZE)]

    for refused in (["--fit", "tile"], ["--tile-overlap", "8"]):
        code, output = finish(start("producer", "enqueue", str(shared / "in"), "--by-reference", *out, *refused,
                                    *common))
        assert code == 2 and "--by-reference resizes every image" in output, output
        assert QueueStore(client, queue_name).counts().total == 0

    producer = start("producer", "enqueue", str(shared / "in"), "--by-reference", *out, *common)
    wait_until(lambda: enqueued(client, queue_name, 2), 120, "the 2 references enqueued", producer)
    worker = start("worker", "run", "--engine", str(small_engine), "--burst", *common)
    assert finish(worker)[0] == 0
    code, output = finish(producer)

    assert code == 1, output
    assert "wrote 1 masks; 1 failed; 0 not done yet" in output, output
    failed = [line for line in output.splitlines() if line.startswith("failed: stack.tif: ")]
    assert len(failed) == 1 and "multi-page TIFF with 3 pages" in failed[0], output
    assert "without --by-reference" in failed[0], output
    mask = np.asarray(Image.open(shared / "masks" / "img_000.png"))
    assert mask.shape == (3 * SMALL_SIZE, 3 * SMALL_SIZE)
    assert np.array_equal(mask, expected_masks(small_engine, [large])["img_000.png"])  # resized, not tiled


def test_by_reference_max_pending_bounds_the_records_held_and_every_image_finishes(tmp_path, client, queue_name):
    """The producer tops the queue up a quarter of --max-pending at a time, never holding more than it.

    A thread stands in for the workers (it marks every stored image written); the producer side is the real one.
    """
    import threading
    import time

    from producer.enqueue import Enqueuer
    from producer.references import FinishedImages, enqueue_references

    write_synthetic_images(tmp_path / "images", 20)
    enqueuer = Enqueuer(client, segmentation_queue(client, queue_name), 2)
    store = enqueuer.store
    held, stop = [0], threading.Event()

    def finish_everything_stored() -> None:
        while not stop.is_set():
            ids = list(store.manifest())
            held[0] = max(held[0], len(ids))
            store.save_results([], written=ids)
            time.sleep(0.005)

    finisher = threading.Thread(target=finish_everything_stored, daemon=True)
    finisher.start()
    try:
        pending = FinishedImages(store, poll_s=0.01)
        report = enqueue_references(enqueuer, str(tmp_path / "images"), str(tmp_path / "masks"), 64, 64, pending,
                                    max_pending=8, pending_timeout_s=60)
        assert pending.drain(time.monotonic() + 60)
    finally:
        stop.set()
        finisher.join(timeout=5)
    assert len(report.image_ids) == 20 and len(pending.report.written) == 20
    assert 0 < held[0] <= 8
    assert store.manifest() == {} and store.record_counts() == (0, 0)  # every finished record freed


@pytest.mark.parametrize("interrupt", ["sigint_before_the_worker", "sigkill_after_the_worker"])
def test_collect_after_an_interrupted_by_reference_producer_reports_and_frees_every_image(
        tmp_path, redis_url, client, queue_name, small_engine, interrupt):
    """The producer that would free the records dies (Ctrl-C while it waits, or SIGKILL once the worker finished):
    `producer collect --delete` counts each finished image as done where its mask is (not copied to --out), lists
    the failed one with its reason and a mask deleted from DEST as missing, and frees every record it reported."""
    shared = tmp_path / "shared"
    good = write_synthetic_images(shared / "in", 6)
    shutil.copyfile(good[0], shared / "in" / "missing.png")
    common = ["--redis-url", redis_url, "--queue", queue_name]
    producer = start("producer", "enqueue", str(shared / "in"), "--by-reference", "--out", str(shared / "masks"),
                     "--size", str(SMALL_SIZE), "--job-size", "2", *common)
    wait_until(lambda: enqueued(client, queue_name, 7), 120, "the 7 references enqueued", producer)
    (shared / "in" / "missing.png").unlink()
    if interrupt == "sigint_before_the_worker":
        producer.send_signal(signal.SIGINT)
        assert finish(producer)[0] == 130
    else:
        producer.send_signal(signal.SIGSTOP)  # it frees nothing from here on
    worker = start("worker", "run", "--engine", str(small_engine), "--burst", *common)
    assert finish(worker)[0] == 0
    if interrupt == "sigkill_after_the_worker":
        producer.kill()
        producer.wait(timeout=30)
    store = QueueStore(client, queue_name)
    assert store.record_counts() == (7, 0) and store.counts().collected == 0  # nobody freed them

    out = tmp_path / "collected"
    mask_of_img_001 = shared / "masks" / "img_001.png"
    kept = mask_of_img_001.read_bytes()
    mask_of_img_001.unlink()  # deleted from DEST since: reported, not freed
    code, output = finish(start("producer", "collect", "--out", str(out), "--delete", "--workers", "1", *common))
    assert code == 1, output
    failed = {line.split(": ", 2)[1]: line for line in output.splitlines() if line.startswith("failed: ")}
    assert set(failed) == {"missing.png", "img_001.png"}, output
    assert "no such file or directory" in failed["missing.png"].lower(), output
    assert f"its mask {mask_of_img_001} is not there" in failed["img_001.png"], output
    assert (f"wrote 0 masks; 5 enqueued by reference already at their mask locations, not copied to {out} "
            f"({shared / 'masks'}); 2 failed; 0 not done yet") in output, output
    assert not out.exists() or not any(out.rglob("*"))  # nothing copied
    assert store.record_counts() == (1, 0) and list(store.manifest().values()) == ["img_001.png"]

    mask_of_img_001.write_bytes(kept)  # back in place: the next collect finds it
    code, output = finish(start("producer", "collect", "--out", str(out), "--delete", *common))
    assert code == 0, output
    assert "wrote 0 masks; 1 enqueued by reference already at their mask locations" in output, output
    assert "; 0 failed; 0 not done yet" in output, output
    assert sorted(p.name for p in (shared / "masks").rglob("*")) == [p.name for p in good]
    leftover = {key.decode() for key in client.scan_iter(match=f"segq:{queue_name}:*")}
    assert leftover <= {f"segq:{queue_name}:totals", f"segq:{queue_name}:producers"}, leftover
    assert store.record_counts() == (0, 0) and store.manifest() == {}

    code, output = finish(start("producer", "status", "--json", *common))
    assert code == 0, output
    images = json.loads(output.strip().splitlines()[-1])["images"]
    assert images == {"queued": 0, "started": 0, "finished": 6, "failed": 1}, output
