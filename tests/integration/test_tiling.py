"""Large images and stacks through the real commands: `producer enqueue` cuts tiles, `worker run` batches them like
any image, `producer collect` stitches them at full resolution and writes stacks as multi-page TIFFs. Real
redis-server, real ONNX engines (the width-8 64 px one; the trained demo engine for the Dice comparison)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from broker.store import QueueStore
from common.metrics import dice
from engines import DEMO_ONNX
from engines.base import infer
from engines.loader import load_engine
from tests.conftest import SMALL_SIZE, tiny_unet
from tests.helpers import log_events
from toolchain.synth import generate, generate_stack

BIN = Path(sys.executable).parent
OVERLAP = 16  # px: the default for a 64 px engine (a quarter of it)


@pytest.fixture(scope="module")
def split_engine(tmp_path_factory) -> Path:
    """A width-8 64 px ONNX U-Net whose head bias splits pixels about 50/50 (an untrained one says one class
    everywhere, which would make any stitching look right)."""
    import torch

    from toolchain.export import export_onnx

    model = tiny_unet(bn_stats=True)
    images = np.stack([image for image, _ in generate(4, SMALL_SIZE, seed=3)])
    with torch.inference_mode():
        logits = model(torch.from_numpy(images).float().unsqueeze(1) / 255.0)
        model.head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    path = tmp_path_factory.mktemp("tiling") / "split_w8_64.onnx"
    export_onnx(model, path, height=SMALL_SIZE, width=SMALL_SIZE, max_batch=8)
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the console scripts to completion."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)


def run_all(folder: Path, out: Path, engine: Path, redis_url: str, queue_name: str, *enqueue_args: str,
            size: int = SMALL_SIZE, log_file: Path | None = None) -> subprocess.CompletedProcess:
    """enqueue FOLDER, one worker until the queue is empty, collect into OUT; returns collect's result."""
    common = ["--redis-url", redis_url, "--queue", queue_name]
    enq = cli("producer", "enqueue", str(folder), "--size", str(size), "--job-size", "3", "--workers", "1",
              *enqueue_args, *common)
    assert enq.returncode in (0, 1), enq.stderr
    logs = ["--log-file", str(log_file)] if log_file else []
    work = cli("worker", "run", "--engine", str(engine), "--burst", *logs, *common)
    assert work.returncode == 0, work.stderr + work.stdout
    return cli("producer", "collect", "--out", str(out), *common)


def reference_mask(engine_path: Path, page: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Written apart from common/tiles.py: origins every tile - overlap px, the last flush with the page's end;
    each tile through the engine alone; each pixel from the tile whose centre is nearest (the tile it is furthest
    inside of; the first on a tie)."""
    height, width = page.shape

    def origins(length: int) -> list[int]:
        found, start = [], 0
        while True:
            found.append(min(start, max(0, length - tile)))
            if found[-1] + tile >= length:
                return found
            start += tile - overlap

    padded = np.pad(page, ((0, max(0, tile - height)), (0, max(0, tile - width))), mode="reflect")
    rows, columns = origins(height), origins(width)
    out = np.zeros((height, width), np.uint8)
    best = np.full((height, width), np.inf)
    ys, xs = np.mgrid[0:height, 0:width]
    with load_engine(engine_path) as engine:
        for top in rows:
            for left in columns:
                mask = infer(engine, padded[None, top:top + tile, left:left + tile].copy())[0]
                centre_y, centre_x = top + (tile - 1) / 2, left + (tile - 1) / 2
                distance = (ys - centre_y) ** 2 + (xs - centre_x) ** 2
                inside = (ys >= top) & (ys < top + tile) & (xs >= left) & (xs < left + tile)
                better = inside & (distance < best)
                out[better] = mask[(ys - top)[better], (xs - left)[better]]
                best[better] = distance[better]
    return out


def test_a_large_image_and_a_small_one_equal_a_per_tile_reference(tmp_path, redis_url, queue_name, split_engine,
                                                                  client):
    (large, _), = generate(1, (150, 200), seed=8)
    (small, _), = generate(1, (40, 50), seed=9)
    (exact, _), = generate(1, SMALL_SIZE, seed=10)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, pixels in (("large.png", large), ("small.png", small), ("exact.png", exact)):
        Image.fromarray(pixels).save(folder / name)
    log_file = tmp_path / "worker.log"

    got = run_all(folder, tmp_path / "masks", split_engine, redis_url, queue_name, log_file=log_file)
    assert got.returncode == 0, got.stderr + got.stdout

    for name, pixels in (("large.png", large), ("small.png", small), ("exact.png", exact)):
        written = np.asarray(Image.open(tmp_path / "masks" / name)) // 255
        assert written.shape == pixels.shape, name
        expected = reference_mask(split_engine, pixels, SMALL_SIZE, OVERLAP)
        assert 0.05 < expected.mean() < 0.95, name  # both classes: the comparison means something
        assert np.array_equal(written, expected), name
    batches = log_events(log_file, "batch")
    assert sum(b["tiles"] for b in batches) == 12 + 1  # large: 3 x 4 tiles, small: one padded tile, exact: none
    assert {t for b in batches for t in (b["tile_of"] or []) if t} and sum(b["batch_size"] for b in batches) == 14
    assert QueueStore(client, queue_name).tiled_records() != []  # kept until collected with --delete


def test_an_image_of_exactly_the_input_size_gives_the_same_mask_tiled_or_resized(tmp_path, redis_url, queue_name,
                                                                                 split_engine):
    (exact, _), = generate(1, SMALL_SIZE, seed=12)
    (tmp_path / "in").mkdir()
    Image.fromarray(exact).save(tmp_path / "in" / "exact.png")
    for fit in ("tile", "resize"):
        got = run_all(tmp_path / "in", tmp_path / fit, split_engine, redis_url, f"{queue_name}-{fit}", "--fit", fit)
        assert got.returncode == 0, got.stderr
    tiled, resized = (np.asarray(Image.open(tmp_path / fit / "exact.png")) for fit in ("tile", "resize"))
    assert 0 < tiled.mean() < 255 and np.array_equal(tiled, resized)


def test_a_five_page_stack_comes_back_as_a_five_page_mask_tiff_in_order(tmp_path, redis_url, queue_name,
                                                                       split_engine, client):
    images, _ = generate_stack(5, (100, 80), seed=4)
    (tmp_path / "in" / "z").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "in" / "z" / "stack.tif", images, photometric="minisblack", metadata=None)
    (tmp_path / "pages").mkdir()
    for page, pixels in enumerate(images):  # each page on its own, to compare with
        Image.fromarray(pixels).save(tmp_path / "pages" / f"page{page}.png")

    got = run_all(tmp_path / "in", tmp_path / "masks", split_engine, redis_url, queue_name)
    assert got.returncode == 0, got.stderr
    alone = run_all(tmp_path / "pages", tmp_path / "alone", split_engine, redis_url, f"{queue_name}-alone")
    assert alone.returncode == 0, alone.stderr

    masks = tifffile.imread(tmp_path / "masks" / "z" / "stack.tif")
    assert masks.shape == (5, 100, 80) and set(np.unique(masks)) <= {0, 255}
    for page in range(5):
        expected = np.asarray(Image.open(tmp_path / "alone" / f"page{page}.png"))
        assert np.array_equal(masks[page], expected), page
    assert len({masks[page].tobytes() for page in range(5)}) == 5  # distinct pages: the order is checked

    status = json.loads(cli("producer", "status", "--json", "--redis-url", redis_url, "--queue", queue_name).stdout)
    assert status["tiled_images"] == 1 and status["tiles"] == 5 * 4 == status["images"]["finished"]
    deleted = cli("producer", "collect", "--out", str(tmp_path / "again"), "--delete", "--redis-url", redis_url,
                  "--queue", queue_name)
    assert deleted.returncode == 0 and (tmp_path / "again" / "z" / "stack.tif").exists()
    store = QueueStore(client, queue_name)
    assert store.record_counts() == (0, 0) and store.tiled_records() == [] and store.counts().collected == 20


def test_one_bad_tile_fails_its_image_with_the_reason_and_nothing_else(tmp_path, redis_url, queue_name,
                                                                      split_engine, client):
    images, _ = generate_stack(3, (100, 80), seed=5)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "stack.tif", images, photometric="minisblack", metadata=None)
    Image.fromarray(images[0]).save(tmp_path / "in" / "plain.png")
    common = ["--redis-url", redis_url, "--queue", queue_name]
    assert cli("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), *common).returncode == 0
    store = QueueStore(client, queue_name)
    parent_id, = [i for i, raw in store.tiled_records() if b'"stack.tif"' in raw]  # plain.png is tiled too
    bad = f"{parent_id}.{4 + 2}"  # 2 x 2 tiles per page: page 2, tile 3
    client.hset(f"segq:{queue_name}:img:{bad}", "data", b"garbage")

    assert cli("worker", "run", "--engine", str(split_engine), "--burst", *common).returncode == 0
    got = cli("producer", "collect", "--out", str(tmp_path / "masks"), *common)
    assert got.returncode == 1
    assert "failed: stack.tif: page 2 of 3, tile 3 of 4: pixels of image" in got.stderr
    assert "corrupt" in got.stderr
    assert (tmp_path / "masks" / "plain.png").exists() and not (tmp_path / "masks" / "stack.tif").exists()


def test_a_bad_page_rejects_its_file_and_leaves_no_tiles(tmp_path, redis_url, queue_name, client):
    (tmp_path / "in").mkdir()
    with tifffile.TiffWriter(tmp_path / "in" / "mixed.tif") as tiff:
        for height in (100, 100, 90):
            tiff.write(np.zeros((height, 80), np.uint8), photometric="minisblack", metadata=None)
    Image.fromarray(np.zeros((100, 80), np.uint8)).save(tmp_path / "in" / "fine.png")
    enq = cli("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), "--redis-url", redis_url,
              "--queue", queue_name)
    assert enq.returncode == 1
    assert "mixed.tif: page 3 of 3: size 80x90 differs from page 1's 80x100" in enq.stdout + enq.stderr
    assert "enqueued 1 images in 1 jobs (1 of them as 4 tiles)" in enq.stdout
    assert QueueStore(client, queue_name).record_counts() == (4, 0)


def test_max_pending_counts_tiles_and_lets_a_file_larger_than_it_through_alone(tmp_path, redis_url, queue_name,
                                                                              split_engine):
    (tmp_path / "in").mkdir()
    for index, (pixels, _) in enumerate(generate(3, (150, 200), seed=20)):  # 12 tiles each
        Image.fromarray(pixels).save(tmp_path / "in" / f"big{index}.png")
    common = ["--redis-url", redis_url, "--queue", queue_name]
    worker = subprocess.Popen([str(BIN / "worker"), "run", "--engine", str(split_engine), *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        enq = cli("producer", "enqueue", str(tmp_path / "in"), "--size", str(SMALL_SIZE), "--max-pending", "5",
                  "--out", str(tmp_path / "masks"), "--timeout", "120", "--workers", "1", *common)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert enq.returncode == 0, enq.stderr
    assert "wrote 3 masks; 0 failed" in enq.stdout
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["big0.png", "big1.png", "big2.png"]


@pytest.mark.slow  # full size: the trained 512 px demo engine on a 2048x1536 image
def test_tiles_beat_resizing_on_a_large_synthetic_image(tmp_path, redis_url, queue_name):
    (pixels, truth), = generate(1, (1536, 2048), seed=2026)
    (tmp_path / "in").mkdir()
    Image.fromarray(pixels).save(tmp_path / "in" / "large.png")
    scores = {}
    for fit in ("tile", "resize"):
        got = run_all(tmp_path / "in", tmp_path / fit, DEMO_ONNX, redis_url, f"{queue_name}-{fit}", "--fit", fit,
                      size=512)
        assert got.returncode == 0, got.stderr
        mask = np.asarray(Image.open(tmp_path / fit / "large.png")) > 127
        assert mask.shape == (1536, 2048)
        scores[fit] = dice(mask, truth.astype(bool))
    assert scores["tile"] > scores["resize"] + 0.05, scores
