"""How long one `producer enqueue` takes before its first image and first job reach Redis.

    python benchmarks/producer_startup.py --images 16000 --workers 8,16

In the scale-out benchmark the GPU waits for the producer's start-up: with 16,000 images on an H200
about 1.7 s passed between starting `producer enqueue` and the worker's first batch, a tenth of the
whole run. This script splits that time on the machine at hand, with the real command as its own
process against a private `redis-server` (AOF everysec, or off with --no-aof) and PNG files on disk (`engines synth`,
hard-linked under --images names):

- `import producer.cli` alone (python -X importtime's total, in a fresh interpreter);
- for each --workers value: process start -> first image stored (manifest non-empty) -> first job
  queued (rq list non-empty) -> all images stored -> process exit, polled every 2 ms; and Redis's
  CPU per 1,000 images (all its threads, and the main thread that runs the commands) with the main
  thread's busy share of the run (near 1: Redis was the bound).

Prints a table and writes benchmarks/results/producer_startup_<machine>_<timestamp>.json (date,
machine, versions, command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale_out import (  # noqa: E402
    Children,
    redis_binary,
    redis_delta,
    redis_snapshot,
    start_redis,
    toolchain_module,
    versions,
)
from broker.jobs import segmentation_queue  # noqa: E402
from broker.store import QueueStore  # noqa: E402


def import_seconds() -> float:
    """Cumulative import time of producer.cli in a fresh interpreter (python -X importtime), seconds."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import producer.cli"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    line = next(ln for ln in out.stderr.splitlines() if ln.rstrip().endswith("| producer.cli"))
    return int(line.split("|")[1]) / 1e6


def timeline(folder: Path, n: int, workers: int, url: str, redis_dir: Path, queue: str,
             timeout_s: float) -> dict[str, Any]:
    """Seconds from process start to first image, first job, all images stored, and exit; Redis's CPU for it."""
    client = redis.Redis.from_url(url)
    client.flushall()
    store, jobs = QueueStore(client, queue), segmentation_queue(client, queue)
    before = redis_snapshot(client, redis_dir)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "producer", "enqueue", str(folder), "--workers", str(workers),
                             "--redis-url", url, "--queue", queue], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks: dict[str, float] = {}
    while proc.poll() is None:
        elapsed = time.perf_counter() - started
        if elapsed > timeout_s:
            proc.kill()
            raise RuntimeError(f"producer enqueue did not finish within {timeout_s} s")
        stored = store.counts().total
        if stored and "first_image_s" not in marks:
            marks["first_image_s"] = elapsed
        if "first_job_s" not in marks and jobs.count:
            marks["first_job_s"] = elapsed
        if stored >= n and "all_stored_s" not in marks:
            marks["all_stored_s"] = elapsed
        time.sleep(0.002)
    marks["exit_s"] = time.perf_counter() - started
    after = redis_snapshot(client, redis_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"producer enqueue exited with {proc.returncode}")
    redis_work = redis_delta(before, after, n, after["used_memory"], marks["exit_s"])
    return {"workers": workers, **{k: round(v, 3) for k, v in marks.items()},
            "img_s": round(n / marks["exit_s"], 1),
            **{k: redis_work[k] for k in ("redis_cpu_s_per_1000", "redis_main_thread_cpu_s_per_1000",
                                          "redis_main_thread_busy", "io_threaded_reads")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--workers", default="8,16", help="producer --workers values to time, e.g. 8,16")
    parser.add_argument("--redis-server", default=None, help="redis-server binary (default: as scale_out.py)")
    parser.add_argument("--redis-io-threads", type=int, default=4)
    parser.add_argument("--aof", action=argparse.BooleanOptionalAction, default=True,
                        help="Redis AOF everysec (--no-aof: off, to see what the AOF costs the producer)")
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args()
    now = dt.datetime.now(dt.UTC)
    tmp = Path(tempfile.mkdtemp(prefix="producer_startup_"))
    children = Children()
    redis_bin = args.redis_server or redis_binary()
    try:
        url, _ = start_redis(redis_bin, tmp / "redis", args.aof, args.redis_io_threads, children)
        subprocess.run([sys.executable, *toolchain_module(), "synth", str(tmp / "synth"), "--n", "256"],
                       cwd=ROOT, check=True, capture_output=True, timeout=600)
        originals = sorted((tmp / "synth" / "images").glob("*.png"))
        folder = tmp / "files"
        folder.mkdir()
        for i in range(args.images):
            os.link(originals[i % len(originals)], folder / f"img_{i:06d}.png")
        imports = [round(import_seconds(), 3) for _ in range(3)]
        runs = [timeline(folder, args.images, int(w), url, tmp / "redis", "startup", 600.0)
                for w in args.workers.split(",")]
    finally:
        children.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "producer_startup", "date": now.isoformat(timespec="seconds"), "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "images": args.images,
        "redis_io_threads": args.redis_io_threads, "aof": args.aof, "import_producer_cli_s": imports, "runs": runs,
        "versions": versions(redis_bin), "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    slug = re.sub(r"[^a-z0-9]+", "_", socket.gethostname().lower()).strip("_")
    path = args.out_json or ROOT / "benchmarks" / "results" / f"producer_startup_{slug}_{now:%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"producer start-up on {socket.gethostname()} ({os.cpu_count()} CPUs), {args.images} PNG files, "
          f"AOF {'on' if args.aof else 'off'}, Redis io-threads {args.redis_io_threads}")
    print(f"import producer.cli: {', '.join(f'{s:.3f}' for s in imports)} s")
    print(f"{'workers':>8}{'first image s':>15}{'first job s':>13}{'all stored s':>14}{'exit s':>8}{'img/s':>8}"
          f"{'Redis CPU/1000':>16}{'main thread busy':>18}")
    for run in runs:
        print(f"{run['workers']:>8}{run.get('first_image_s', float('nan')):>15.3f}"
              f"{run.get('first_job_s', float('nan')):>13.3f}"
              f"{run.get('all_stored_s', float('nan')):>14.3f}{run['exit_s']:>8.3f}{run['img_s']:>8.1f}"
              f"{run['redis_cpu_s_per_1000']:>16.3f}{run['redis_main_thread_busy']:>18.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
