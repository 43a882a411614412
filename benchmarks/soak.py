"""Soak under faults: many small images through 3 workers on one Redis (AOF on), workers SIGKILLed at random,
Redis restarted.

    python benchmarks/soak.py --images 20000 --workers 3

Everything runs as users run it, each a separate process: a private `redis-server` (AOF on,
`appendfsync everysec`) on a free port, `producer enqueue` of --images PNG files on disk (copies of
--distinct synthetic 64x64 images), `worker run` processes with the default lease settings and a
width-8 ONNX U-Net (random weights: speed and delivery are measured, not quality), `producer collect`.
While the workers run, every --kill-every seconds (jittered) one random worker is SIGKILLed and
started again; once, after the producer has finished, Redis itself is SIGKILLed and restarted from
its AOF on the same port. Recovery of a kill: from the kill until every job that was started at that
moment is finished; each is listed with the jobs queued at that moment (recovered jobs go to the front
of the queue, so this backlog should not lengthen it). At the end `producer collect` writes every mask;
the script checks that every image has exactly one mask file, that none is lost, and counts the images
run again (at-least-once delivery hands a killed worker's jobs out again; masks are keyed by image, so
a re-run overwrites, never duplicates). That count comes from rq's job records (rerun_counts), not from
the workers' logs: a SIGKILLed worker never writes its last batch lines.

Writes benchmarks/results/soak_<timestamp>.json (images in, masks out, lost, duplicate masks,
rerun jobs and images, kills, Redis restarts, every recovery and the longest) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.jobs import JOB_RETRIES  # noqa: E402
from broker.store import QueueStore  # noqa: E402

QUEUE = "soak"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Redis:
    """A redis-server with AOF on, restartable on the same port and data folder."""

    binary: str
    data_dir: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--logfile", str(self.data_dir / "redis.log")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.05)
        raise SystemExit("error: redis-server did not answer within 60 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@dataclass
class Kill:
    """One SIGKILL and the jobs started at that moment; recovered when all of them are finished."""

    what: str
    at: float
    jobs: list[str]
    queued: int = 0  # jobs waiting in the queue at the kill: the backlog a recovered job must not wait behind
    recovered_s: float | None = None


@dataclass
class Soak:
    args: argparse.Namespace
    tmp: Path
    redis: Redis
    engine: Path
    workers: list[subprocess.Popen] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    started_workers: int = 0

    def common(self) -> list[str]:
        return ["--redis-url", self.redis.url, "--queue", QUEUE]

    def start_worker(self, slot: int) -> subprocess.Popen:
        self.started_workers += 1
        log = self.tmp / "logs" / f"worker{slot}_{self.started_workers}.log"
        with open(log.with_suffix(".out"), "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "worker", "run", "--engine", str(self.engine),
                                     "--log-file", str(log), *self.common()],
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def started_jobs(self, client: redis.Redis) -> list[str]:
        from rq import Queue

        return Queue(QUEUE, connection=client, serializer=JSONSerializer).started_job_registry.get_job_ids()

    def queued_jobs(self, client: redis.Redis) -> int:
        from rq import Queue

        return Queue(QUEUE, connection=client, serializer=JSONSerializer).count

    def check_recoveries(self, client: redis.Redis) -> None:
        for kill in self.kills:
            if kill.recovered_s is not None:
                continue
            jobs = [j for j in Job.fetch_many(kill.jobs, connection=client, serializer=JSONSerializer) if j is not None]
            if all(job.get_status(refresh=False) == JobStatus.FINISHED for job in jobs):
                kill.recovered_s = round(time.monotonic() - kill.at, 2)


@dataclass(frozen=True)
class Reruns:
    """Finished jobs that rq handed out more than once, and their images counted once per extra run."""

    jobs: int
    images: int


def rerun_counts(client: redis.Redis, queue: str) -> Reruns:
    """Re-runs of the queue's finished jobs, from rq's job records: each retry rq made of a job (its worker
    SIGKILLed, or Redis restarted, and its lease lapsed) runs all its images again.

    A retry costs one of the job's `retries_left` (producer enqueue gives JOB_RETRIES), so a finished job
    ran JOB_RETRIES - retries_left extra times. An upper bound on images processed twice (a killed worker
    may not have reached every image of its jobs); never negative.
    """
    from rq import Queue

    job_ids = Queue(queue, connection=client, serializer=JSONSerializer).finished_job_registry.get_job_ids()
    jobs = [job for job in Job.fetch_many(job_ids, connection=client, serializer=JSONSerializer) if job is not None]
    extra = [(max(0, JOB_RETRIES - (job.retries_left if job.retries_left is not None else JOB_RETRIES)),
              int(job.meta.get("images", 0))) for job in jobs]
    return Reruns(jobs=sum(1 for runs, _ in extra if runs), images=sum(runs * images for runs, images in extra))


def tiny_engine(path: Path, size: int) -> Path:
    """A width-8 U-Net with seeded random weights, exported to ONNX at size x size, batch 1..8."""
    import torch

    from engines.unet import UNet, UNetConfig
    from toolchain.export import export_onnx

    torch.manual_seed(0)
    export_onnx(UNet(UNetConfig(width=8)).eval(), path, height=size, width=size, max_batch=8)
    return path


def write_files(tmp: Path, count: int, distinct: int, size: int) -> Path:
    from PIL import Image

    from toolchain.synth import generate

    folder = tmp / "in"
    originals = []
    for i, (image, _) in enumerate(generate(distinct, size=size, seed=3)):
        path = tmp / "originals" / f"o{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        originals.append(path)
    for i in range(count):
        target = folder / f"d{i % 20:02d}" / f"img_{i:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(originals[i % distinct], target)
    return folder


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="soak_"))
    (tmp / "logs").mkdir()
    binary = shutil.which("redis-server")
    if binary is None:
        from broker.server import redis_server_binary

        binary = redis_server_binary()
    (tmp / "redis").mkdir()
    server = Redis(binary, tmp / "redis", free_port())
    server.start()
    soak = Soak(args, tmp, server, tiny_engine(tmp / "tiny.onnx", args.size))
    folder = write_files(tmp, args.images, args.distinct, args.size)
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    store = QueueStore(client, QUEUE)
    try:
        soak.workers = [soak.start_worker(i) for i in range(args.workers)]
        t0 = time.monotonic()
        producer = subprocess.Popen([sys.executable, "-m", "producer", "enqueue", str(folder), "--size",
                                     str(args.size), "--job-size", str(args.job_size), *soak.common()],
                                    cwd=ROOT, stdout=open(tmp / "logs" / "enqueue.out", "wb"), stderr=subprocess.STDOUT)
        next_kill = time.monotonic() + args.kill_every * rng.uniform(0.5, 1.5)
        redis_restarted = False
        producer_done_at = None
        deadline = time.monotonic() + args.timeout
        while True:
            now = time.monotonic()
            if now > deadline:
                raise SystemExit(f"error: not done within {args.timeout} s; logs in {tmp}")
            if producer_done_at is None and producer.poll() is not None:
                if producer.returncode != 0:
                    raise SystemExit(f"error: producer enqueue exited {producer.returncode}; see {tmp}/logs")
                producer_done_at = now
            try:
                done = store.counts().done
                soak.check_recoveries(client)
                if producer_done_at is not None and done >= args.images:
                    break
                if now >= next_kill:
                    slot = rng.randrange(len(soak.workers))
                    jobs, queued = soak.started_jobs(client), soak.queued_jobs(client)
                    soak.workers[slot].kill()
                    soak.workers[slot].wait(timeout=30)
                    soak.kills.append(Kill(f"worker {slot}", time.monotonic(), jobs, queued))
                    soak.workers[slot] = soak.start_worker(slot)
                    next_kill = time.monotonic() + args.kill_every * rng.uniform(0.5, 1.5)
                elif (not redis_restarted and producer_done_at is not None and now - producer_done_at > 2
                      and done < args.images):
                    jobs = soak.started_jobs(client)
                    server.kill()
                    killed = time.monotonic()
                    time.sleep(1.0)
                    server.start()
                    soak.kills.append(Kill("redis", killed, jobs))
                    redis_restarted = True
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass  # Redis restarting: look again
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        settle = time.monotonic() + 60
        while any(k.recovered_s is None for k in soak.kills) and time.monotonic() < settle:
            soak.check_recoveries(client)
            time.sleep(0.25)
        for proc in soak.workers:
            proc.send_signal(signal.SIGTERM)
        for proc in soak.workers:
            proc.wait(timeout=120)
        out = tmp / "masks"
        collect = subprocess.run([sys.executable, "-m", "producer", "collect", "--out", str(out), *soak.common()],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
        masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
        expected = sorted(p.relative_to(folder).with_suffix(".png").as_posix() for p in folder.rglob("*.png"))
        reruns = rerun_counts(client, QUEUE)
        worker_kills = [k for k in soak.kills if k.what != "redis"]
        recoveries = [k.recovered_s for k in soak.kills]
        return {
            "benchmark": "soak",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
            "cpu_count": os.cpu_count(),
            "images_in": args.images,
            "masks_out": len(masks),
            "lost": len(set(expected) - set(masks)),
            "unexpected_masks": len(set(masks) - set(expected)),
            "duplicate_masks": len(masks) - len(set(masks)),
            "rerun_jobs": reruns.jobs,
            "rerun_images": reruns.images,
            "failed_images": store.counts().failed,
            "collect_exit": collect.returncode,
            "workers": args.workers,
            "worker_kills": len(worker_kills),
            "redis_restarts": sum(1 for k in soak.kills if k.what == "redis"),
            "recoveries_s": [{"what": k.what, "recovered_s": k.recovered_s, "jobs_started_at_kill": len(k.jobs),
                              "jobs_queued_at_kill": k.queued} for k in soak.kills],
            "longest_recovery_s": None if None in recoveries or not recoveries else max(recoveries),
            "unrecovered": sum(1 for r in recoveries if r is None),
            "elapsed_s": round(elapsed, 1),
            "img_s": round(args.images / elapsed, 1),
            "size": args.size,
            "job_size": args.job_size,
            "versions": {"python": platform.python_version(),
                         **{d: metadata.version(d) for d in ("rq", "redis", "onnxruntime", "torch")}},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
    finally:
        for proc in soak.workers:
            if proc.poll() is None:
                proc.kill()
        server.kill()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--distinct", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--job-size", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=6.0, help="mean seconds between worker SIGKILLs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep-tmp", action="store_true")
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args()
    result = run(args)
    path = args.out_json or ROOT / "benchmarks" / "results" / f"soak_{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    for key in ("images_in", "masks_out", "lost", "duplicate_masks", "unexpected_masks", "rerun_images",
                "failed_images", "worker_kills", "redis_restarts", "longest_recovery_s", "unrecovered",
                "elapsed_s", "img_s"):
        print(f"{key:<22}{result[key]!s:>12}")
    ok = result["lost"] == 0 and result["duplicate_masks"] == 0 and result["unexpected_masks"] == 0 \
        and result["unrecovered"] == 0 and result["masks_out"] == result["images_in"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
