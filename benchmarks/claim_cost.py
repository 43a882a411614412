"""What one claim costs the thread that makes it: `RqJobSource.claim` of N jobs of 8 images, timed.

    python benchmarks/claim_cost.py --jobs 1,12 --repeats 40

A worker claims the jobs of half its fetch window at once (12 jobs of 8 images with a GPU's 12 decode
processes). This script enqueues jobs of 8 real image records with the producer's Enqueuer into a
private `redis-server` (AOF everysec, idle otherwise) and times each claim in this process: the
three round trips and rq's Python per job. On a GPU worker that time was spent on the main thread
before claims moved to a claim thread (worker/pipeline.py); compare it with one batch's engine time.

Prints a table and writes benchmarks/results/claim_cost_<machine>_<timestamp>.json (date, machine,
CPU, versions, command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402
from benchmarks.scale_out import Children, redis_binary, start_redis  # noqa: E402
from broker import jobs  # noqa: E402
from broker.store import StoredImage  # noqa: E402
from producer.enqueue import Enqueuer  # noqa: E402
from worker.rq_source import RqJobSource  # noqa: E402

JOB_SIZE = 8


def timed_claims(client: redis.Redis, queue: str, jobs_per_claim: int, repeats: int, size: int) -> list[float]:
    """Milliseconds of each of `repeats` claims of `jobs_per_claim` jobs, from a queue filled for them."""
    enqueuer = Enqueuer(client, jobs.segmentation_queue(client, queue), JOB_SIZE)
    pixels = np.zeros((size, size), np.uint8)
    for i in range(jobs_per_claim * repeats * JOB_SIZE):
        enqueuer.add_stored(StoredImage(uuid.uuid4().hex, f"image{i}.png", pixels, size, size, time.time()))
    enqueuer.flush()
    source = RqJobSource(client, queue, name=uuid.uuid4().hex, job_heartbeat_ttl_s=8, maintenance_interval_s=2)
    source.open()
    try:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            claims = source.claim(jobs_per_claim, timeout_s=0)
            times.append((time.perf_counter() - started) * 1000)
            if len(claims) != jobs_per_claim:
                raise SystemExit(f"claimed {len(claims)} jobs, expected {jobs_per_claim}")
        return times
    finally:
        source.close()


def main() -> None:
    """Parse the options, time the claims, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="1,12", help="jobs per claim, comma-separated")
    parser.add_argument("--repeats", type=int, default=40, help="claims timed per row")
    parser.add_argument("--size", type=int, default=64, help="stored image side (the claim reads no pixels)")
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args()
    children = Children()
    rows = []
    try:
        url, _ = start_redis(redis_binary(), Path(tempfile.mkdtemp(prefix="claim_cost_")), True, 1, children)
        client = redis.Redis.from_url(url)
        for n in (int(x) for x in args.jobs.split(",")):
            times = sorted(timed_claims(client, f"claims{n}", n, args.repeats, args.size))
            rows.append({"jobs_per_claim": n, "images": n * JOB_SIZE, "median_ms": round(statistics.median(times), 3),
                         "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3), "max_ms": round(times[-1], 3)})
    finally:
        children.kill_all()
    print(f"{'jobs per claim':>15}{'images':>8}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}")
    for row in rows:
        print(f"{row['jobs_per_claim']:>15}{row['images']:>8}{row['median_ms']:>11.2f}{row['p90_ms']:>9.2f}"
              f"{row['max_ms']:>9.2f}")
    record = {
        "benchmark": "claim_cost", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": socket.gethostname(), "cpu": cpu_model(), "repeats": args.repeats,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"python": platform.python_version(), "rq": metadata.version("rq"),
                     "redis-py": metadata.version("redis")},
        "rows": rows,
    }
    out = args.out_json or ROOT / "benchmarks" / "results" / (
        f"claim_cost_{socket.gethostname()}_{dt.datetime.now():%Y%m%dT%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
