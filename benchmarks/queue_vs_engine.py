"""Throughput through Redis and the batching worker, against the same engine alone, in one run.

    python benchmarks/queue_vs_engine.py --engine engines/demo/unet_w16.onnx --images 96 --device cpu

Engine alone: batches of --max-batch submitted back to back (as many in flight as the engine has
slots). Through the queue: a private redis-server, the images enqueued in jobs of 8 and of 1 images,
then one in-process `worker run --burst`; img/s = images / (first claim -> queue drained), engine
load excluded. Prints a table and writes JSON (date, machine, versions, command) to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.connection import BrokerSettings, connect  # noqa: E402
from broker.jobs import segmentation_queue  # noqa: E402
from broker.server import RedisServer  # noqa: E402
from broker.store import QueueStore, StoredImage, new_image_id, now  # noqa: E402
from engines.loader import load_engine  # noqa: E402
from engines.versions import built_with  # noqa: E402
from producer.enqueue import Enqueuer  # noqa: E402
from toolchain.bench import throughput  # noqa: E402
from toolchain.synth import generate  # noqa: E402
from worker.logs import configure_logging  # noqa: E402
from worker.pipeline import BatchPipeline  # noqa: E402
from worker.rq_source import RqJobSource  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.signals import stop_on_signals  # noqa: E402


def engine_alone(engine, images: np.ndarray, max_batch: int) -> float:
    """img/s of the engine alone: len(images) images in batches of max_batch, slots kept in flight."""
    return throughput(engine, images[:max_batch], iters=len(images) // max_batch, warmup=1)


def through_queue(engine, images: np.ndarray, job_size: int, redis_url: str, max_batch: int, log_file: Path) -> float:
    """img/s from the first claim until the queue is drained, for `images` enqueued in jobs of `job_size`."""
    queue_name = f"bench{job_size}_{new_image_id()[:6]}"
    settings = WorkerSettings(broker=BrokerSettings(redis_url=redis_url, queue=queue_name),
                              engine_path=Path("-"), max_batch=max_batch, burst=True, log_file=log_file)
    client = connect(settings.broker)
    enqueuer = Enqueuer(client, segmentation_queue(client, queue_name), job_size)
    store = QueueStore(client, queue_name)
    for pixels in images:
        enqueuer.add_stored(StoredImage(new_image_id(), "bench.png", pixels, *pixels.shape, now()))
    enqueuer.flush()
    source = RqJobSource(client, queue_name, name=f"bench-{queue_name}", job_heartbeat_ttl_s=60,
                         maintenance_interval_s=60)
    log = configure_logging(log_file).bind(worker=source.name, engine=engine.name)
    source.open()  # outside the clock, as a warm worker has already registered
    try:
        with stop_on_signals() as stop:
            start = time.perf_counter()
            done = BatchPipeline(settings, engine, source, client, log, stop).run()
            elapsed = time.perf_counter() - start
    finally:
        source.close()
    assert done == len(images) == store.counts().done, (done, len(images))
    client.flushdb()  # a private server: free the images before the next run
    return len(images) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    engine = load_engine(args.engine, device=args.device, precision=args.precision)
    spec = engine.spec
    images = np.stack([image for image, _ in generate(min(args.images, 32), size=spec.height, seed=7)])
    images = np.resize(images, (args.images, spec.height, spec.width))
    engine_alone(engine, images[: args.max_batch * 2], args.max_batch)  # warm-up

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        server = RedisServer(data_dir=Path(tmp), port=port).start()
        try:
            for _ in range(args.repeats):
                alone = engine_alone(engine, images, args.max_batch)
                rows.append(("engine alone", args.max_batch, alone))
                for job_size in (8, 1):
                    rate = through_queue(engine, images, job_size, server.url, args.max_batch, Path(tmp) / "w.log")
                    rows.append((f"queue, jobs of {job_size}", args.max_batch, rate))
        finally:
            server.stop()
            engine.close()

    best: dict[str, float] = {}
    for variant, _, rate in rows:
        best[variant] = max(best.get(variant, 0.0), rate)
    base = best["engine alone"]
    table = [{"variant": v, "batch": args.max_batch, "images": args.images, "img_per_s": round(r, 2),
              "vs_engine": round(r / base, 3)} for v, r in best.items()]
    print(f"{'variant':<22}{'batch':>6}{'images':>8}{'img/s':>10}{'vs engine':>11}")
    for row in table:
        print(f"{row['variant']:<22}{row['batch']:>6}{row['images']:>8}{row['img_per_s']:>10.2f}{row['vs_engine']:>11.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "queue_vs_engine",
        "date": stamp.isoformat(timespec="seconds"),
        "machine": {"host": socket.gethostname(), "platform": platform.platform(), "cpu": platform.processor(),
                    "cores": _cores()},
        "gpu": _gpu_name(args.device),
        "versions": {**built_with(args.device), "rq": _dist("rq"), "redis": _dist("redis")},
        "engine": {"file": str(args.engine), "name": engine.name, "precision": spec.precision,
                   "size": [spec.height, spec.width]},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "all_runs": [{"variant": v, "img_per_s": round(r, 2)} for v, _, r in rows],
        "table": table,
    }
    path = args.out / f"queue_vs_engine_{args.device.replace(':', '')}_{stamp:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dist(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


if __name__ == "__main__":
    main()
