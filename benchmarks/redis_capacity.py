"""How many images a second one Redis carries: its main thread's CPU per image, by bytes and by reference.

    python benchmarks/redis_capacity.py --images 512 --job-sizes 8,1

Redis runs every command on one thread, so the images a second one Redis can carry is about
1,000 / (main-thread CPU ms per image). This measures that CPU (INFO's used_cpu_sys_main_thread +
used_cpu_user_main_thread) through the real commands, as separate processes, with one private
`redis-server` (AOF on, everysec; benchmarks/scale_out.py's), for each mode and job size:

- bytes: `producer enqueue DIR --out MASKS --max-pending M --job-size J` (images stored in Redis,
  masks collected from Redis by the producer and freed);
- reference: `producer enqueue DIR --by-reference --out MASKS --max-pending M --job-size J` (only
  locations in Redis; the worker reads the files and writes the masks).

One `worker run` serves the queue, started and ready before the producer. Its engine is a
stand-in that costs almost nothing (a 1x1 convolution to two classes, ONNX at the images' size,
built here), so that the run goes as fast as this machine's cores decode and the Redis side is
what is measured; the U-Net's own speed does not change Redis's work per image. Files are
`engines synth` PNGs (--distinct of them, copied to --images names).

The window is the producer's whole run (enqueue, the worker's claims, fetches and completions,
masks collected or freed). Its main-thread CPU is per-image work plus costs per second of the run
(the worker's heartbeats and blocking pops, the producer's polls every 0.2 s, Redis's own cron and
the event loop waking for them) plus what the run costs once (connections): a GPU run finishes the
same images in a fraction of the time, so the per-second part must not be counted per image.

- By reference (the headline figure), per image and per second are separated by two runs of the
  same --images at two rates: at --size and at --fit-size (smaller images decode faster; Redis's
  work per image is the same, the record holds locations, not pixels). With cpu_ms = per_image_ms *
  images + per_s_ms * wall_s for both runs, the two unknowns are solved (`per_image_fit`); what the
  run costs once stays in the per-image figure. This VM's main-thread CPU for the same work varies
  by tens of percent from run to run, so --repeats pairs are fitted and the median is reported
  (all in `fits`); the single-run estimate below is kept as `redis_main_ms_per_image_single_run`.
- By bytes (payload size changes with --size, so no second size), and in every run's
  `redis_main_ms_per_image_single_run`/`redis_main_ms_per_image` before the fit: the window's CPU less
  the worker's idle rate (measured for --idle-s before the producer starts) times the run's
  duration, less the share of command time spent on the producer's polling (POLLING_COMMANDS, from
  INFO commandstats); the raw figure is kept beside it.

With --pin (the default) Redis's main thread has the first CPU to itself and the clients share the
others: on this 2-CPU VM the clients then decode on one core (slower runs), and the main thread's
CPU for the same work varies less.

Each run also records INFO commandstats per image (`command_calls_per_image`, `command_usec_per_image`:
EXEC's usec includes the commands it ran, which are also counted under their own names),
`commands_per_image` (EXEC not counted) and the client reads and writes per image (round trips,
`reads_per_image`): command execution is only part of the main thread's CPU, the rest is reading,
parsing and replying per round trip and feeding the AOF per command.

Writes benchmarks/results/redis_capacity_<job sizes>_<timestamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402
from benchmarks.scale_out import (  # noqa: E402
    PRODUCER,
    WORKER,
    BenchError,
    Children,
    events,
    redis_binary,
    redis_snapshot,
    run,
    start_redis,
    toolchain_module,
    versions,
    write_files,
)


def pointwise_engine(path: Path, size: int) -> Path:
    """A stand-in engine file (ONNX + metadata) at size x size: a 1x1 convolution to two class logits."""
    import torch

    from engines.unet import UNet, UNetConfig
    from toolchain.export import export_onnx

    class Pointwise(UNet):
        def __init__(self) -> None:
            super().__init__(UNetConfig(width=2))
            self.pointwise = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pointwise(x)

    torch.manual_seed(0)
    export_onnx(Pointwise().eval(), path, height=size, width=size, max_batch=8)
    return path


def io_events(client: redis.Redis) -> tuple[int, int]:
    """INFO stats: (client reads, client writes) the server has processed since start: its round trips."""
    info = client.info("stats")
    return int(info.get("total_reads_processed", 0)), int(info.get("total_writes_processed", 0))


@dataclass(frozen=True)
class ImageSet:
    """The files of one run and the stand-in engine at their size (pixels, square)."""

    size: int
    folder: Path
    engine: Path


def image_set(args: argparse.Namespace, tmp: Path, size: int) -> ImageSet:
    """--images synthetic PNGs of size x size (--distinct of them, copied) and a pointwise engine at that size."""
    data = tmp / f"data_{size}"
    run([sys.executable, *toolchain_module(), "synth", str(data), "--n", str(args.distinct), "--size", str(size)],
        args.timeout, "engines synth")
    folder = write_files(data / "images", tmp / f"parts_{size}", args.images, 1)[0]
    return ImageSet(size, folder, pointwise_engine(tmp / f"pointwise_{size}.onnx", size))


def per_image_fit(slow: dict[str, Any], fast: dict[str, Any]) -> dict[str, Any]:
    """Split the main thread's CPU of two runs of the same images, at two rates, into a cost per image and a
    cost per second: cpu_ms = per_image_ms * images + per_s_ms * wall_s, solved for both.

    By reference Redis's work per image does not depend on the pixels (the record is the same), so the
    two runs differ only in how long they last. What the run costs once (the producer's connection and
    setup) is left in the per-image cost, which it can only raise.
    """
    n = slow["images"]
    d_wall = slow["wall_s"] - fast["wall_s"]
    per_s = (slow["redis_main_cpu_ms"] - fast["redis_main_cpu_ms"]) / d_wall
    per_image = (fast["redis_main_cpu_ms"] * slow["wall_s"] - slow["redis_main_cpu_ms"] * fast["wall_s"]) / (n * d_wall)
    return {"sizes": [slow["size"], fast["size"]], "walls_s": [slow["wall_s"], fast["wall_s"]],
            "cpu_ms": [slow["redis_main_cpu_ms"], fast["redis_main_cpu_ms"]],
            "per_s_ms": round(per_s, 3), "per_image_ms": round(per_image, 4),
            "images_per_s_one_redis": round(1000 / per_image) if per_image > 0 else None}


def pin_redis(redis_pid: int) -> dict[str, list[int]] | None:
    """Redis's main thread on the first CPU, this process and the clients it starts (producer, worker and its
    decode processes) on the others; None with fewer than 2 CPUs. The main thread's CPU time for the same work
    varies much less when the clients' decoding does not share its core (caches, scheduling)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(redis_pid, {cpus[0]})  # the pid is the main thread's id: only it moves
    os.sched_setaffinity(0, set(cpus[1:]))  # inherited by every process started from now on
    return {"redis_main_thread": cpus[:1], "clients": cpus[1:]}


def main_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys_main_thread"]) + float(info["used_cpu_user_main_thread"])


# The producer's polling (producer/stream.py, producer/references.py: which of its pending images finished, every
# 0.2 s) and the queue counts it reads first: a cost per second of waiting, not per image.
POLLING_COMMANDS = ("sismember", "hexists", "hlen", "scard")


def command_stats(client: redis.Redis) -> dict[str, tuple[int, float]]:
    """INFO commandstats: (calls, microseconds executing) of each command since start (EXEC's usec includes
    its queued commands', which are also counted under their own names)."""
    stats: dict[str, tuple[int, float]] = {}
    for name, entry in client.info("commandstats").items():
        command = name.removeprefix("cmdstat_").split("|")[0]
        calls, usec = stats.get(command, (0, 0.0))
        stats[command] = (calls + int(entry["calls"]), usec + float(entry["usec"]))
    return stats


Stats = dict[str, tuple[int, float]]


def stats_delta(before: Stats, after: Stats) -> Stats:
    """Per command: (calls, usec) between two command_stats snapshots (the snapshot's INFO itself included)."""
    return {name: (calls - before.get(name, (0, 0.0))[0], usec - before.get(name, (0, 0.0))[1])
            for name, (calls, usec) in after.items() if calls > before.get(name, (0, 0.0))[0]}


def measure(args: argparse.Namespace, client: redis.Redis, url: str, redis_dir: Path, tmp: Path, images: ImageSet,
            mode: str, job_size: int, children: Children) -> dict[str, Any]:
    """One producer run with one worker; the Redis main thread's CPU per image over it."""
    engine, folder, size = images.engine, images.folder, images.size
    queue = f"cap_{mode}_{job_size}_{size}"
    common = ["--redis-url", url, "--queue", queue]
    log = tmp / "logs" / f"worker_{queue}.log"
    worker = children.start([sys.executable, *WORKER, "run", "--engine", str(engine), "--max-batch", "8",
                             "--decode-processes", str(args.decode_processes), "--log-file", str(log), *common],
                            log.with_suffix(".out"))
    deadline = time.monotonic() + 300
    while not events(log, "worker_ready"):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"worker not ready; see {log.with_suffix('.out')}")
        time.sleep(0.2)
    idle_before = main_cpu_s(client)
    time.sleep(args.idle_s)
    idle_ms_per_s = (main_cpu_s(client) - idle_before) * 1000 / args.idle_s
    masks = tmp / f"masks_{queue}"
    argv = [sys.executable, *PRODUCER, "enqueue", str(folder), "--out", str(masks), "--max-pending",
            str(args.max_pending), "--job-size", str(job_size), "--size", str(size), "--workers",
            str(args.producer_workers), *common]
    if mode == "reference":
        argv.insert(argv.index("--out"), "--by-reference")
    before, stats_before, io_before = redis_snapshot(client, redis_dir), command_stats(client), io_events(client)
    wall, out = run(argv, args.timeout, f"producer enqueue ({mode}, jobs of {job_size})")
    after, stats_after, io_after = redis_snapshot(client, redis_dir), command_stats(client), io_events(client)
    stats = stats_delta(stats_before, stats_after)
    usec = {name: value for name, (_, value) in stats.items()}
    polling_share = sum(usec.get(name, 0.0) for name in POLLING_COMMANDS) / max(1.0, sum(usec.values()))
    (tmp / "logs" / f"producer_{queue}.out").write_text(out)
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=120)
    written = sum(1 for _ in masks.rglob("*.png"))
    if written != args.images:
        raise BenchError(f"{mode}, jobs of {job_size}: {written} masks of {args.images}:\n{out[-2000:]}")
    shutil.rmtree(masks)
    n = args.images
    raw_ms = (after["main_cpu_s"] - before["main_cpu_s"]) * 1000 / n
    # per image: the main thread's CPU less the worker's idle rate over the run, less the polling's share of it
    main_ms = max(0.0, raw_ms - idle_ms_per_s * wall / n) * (1 - polling_share)
    client.flushall()
    return {
        "mode": mode, "job_size": job_size, "size": size, "images": n, "wall_s": round(wall, 3),
        "img_s": round(n / wall, 1),
        "redis_main_cpu_ms": round((after["main_cpu_s"] - before["main_cpu_s"]) * 1000, 3),  # the whole window
        "redis_main_ms_per_image": round(main_ms, 4),
        "redis_main_ms_per_image_raw": round(raw_ms, 4),  # everything in the window, at this run's rate
        "polling_share_of_command_time": round(polling_share, 3),
        "command_usec_per_image": {name: round(value / n, 2)
                                   for name, value in sorted(usec.items(), key=lambda kv: -kv[1]) if value > 0},
        "command_calls_per_image": {name: round(calls / n, 3)
                                    for name, (calls, _) in sorted(stats.items(), key=lambda kv: -kv[1][0])},
        "reads_per_image": round((io_after[0] - io_before[0]) / n, 3),  # round trips (client reads) per image
        "writes_per_image": round((io_after[1] - io_before[1]) / n, 3),
        "commands_per_image": round(sum(calls for name, (calls, _) in stats.items() if name != "exec") / n, 2),
        "redis_all_threads_ms_per_image": round((after["cpu_s"] - before["cpu_s"]) * 1000 / n, 4),
        "redis_main_thread_busy": round((after["main_cpu_s"] - before["main_cpu_s"]) / wall, 3),
        "redis_net_in_bytes_per_image": round((after["net_in_bytes"] - before["net_in_bytes"]) / n),
        "redis_net_out_bytes_per_image": round((after["net_out_bytes"] - before["net_out_bytes"]) / n),
        "aof_bytes_per_image": round((after["aof_bytes"] - before["aof_bytes"]) / n),
        "idle_main_ms_per_s": round(idle_ms_per_s, 3),
        "images_per_s_one_redis": round(1000 / main_ms) if main_ms > 0 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--distinct", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--fit-size", type=int, default=64,
                        help="by reference, a second run at this image size (faster) separates the per-second costs "
                             "from the per-image ones (0: no second run)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="by reference, pairs of runs fitted; the median fit is reported (all are kept)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="Redis's main thread on a CPU of its own, the clients on the others (pin_redis)")
    parser.add_argument("--job-sizes", default="8,1")
    parser.add_argument("--modes", default="bytes,reference")
    parser.add_argument("--max-pending", type=int, default=256)
    parser.add_argument("--producer-workers", type=int, default=1)
    parser.add_argument("--decode-processes", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args()
    job_sizes = [int(x) for x in args.job_sizes.split(",")]
    modes = args.modes.split(",")
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="redis_capacity_"))
    redis_bin = redis_binary()
    rows = []
    try:
        redis_dir = tmp / "redis"
        url, redis_proc = start_redis(redis_bin, redis_dir, True, 1, children)
        pinned = pin_redis(redis_proc.pid) if args.pin else None
        client = redis.Redis.from_url(url, socket_timeout=30)
        images = image_set(args, tmp, args.size)
        fast = image_set(args, tmp, args.fit_size) if args.fit_size and "reference" in modes else None
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        for job_size in job_sizes:
            for mode in modes:
                row = measure(args, client, url, redis_dir, tmp, images, mode, job_size, children)
                if mode == "reference" and fast is not None:
                    row["fast_run"] = measure(args, client, url, redis_dir, tmp, fast, mode, job_size, children)
                    fits = [per_image_fit(row, row["fast_run"])]
                    for _ in range(args.repeats - 1):  # the main thread's CPU for the same work varies run to run
                        slow_again = measure(args, client, url, redis_dir, tmp, images, mode, job_size, children)
                        fast_again = measure(args, client, url, redis_dir, tmp, fast, mode, job_size, children)
                        fits.append(per_image_fit(slow_again, fast_again))
                    row["fits"] = fits
                    row["fit"] = sorted(fits, key=lambda fit: fit["per_image_ms"])[len(fits) // 2]  # the median
                    row["redis_main_ms_per_image_single_run"] = row["redis_main_ms_per_image"]
                    row["redis_main_ms_per_image"] = row["fit"]["per_image_ms"]
                    row["images_per_s_one_redis"] = row["fit"]["images_per_s_one_redis"]
                rows.append(row)
                print(f"{mode:>9}, jobs of {job_size}: {row['redis_main_ms_per_image']:.4f} ms of Redis main thread "
                      f"per image at {row['img_s']} img/s", flush=True)
    except BaseException:
        children.kill_all()
        print(f"failed; logs kept in {tmp}", file=sys.stderr)
        raise
    children.kill_all()
    now = dt.datetime.now(dt.UTC)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    machine = f"{socket.gethostname()}: {cpu_model()}, {os.cpu_count()} CPUs (no GPU; Redis-side figures)"
    by_job = {}
    for job_size in job_sizes:
        pick = {row["mode"]: row for row in rows if row["job_size"] == job_size}
        by_job[job_size] = {
            "job_size": job_size,
            "redis_main_ms_per_image_bytes": pick.get("bytes", {}).get("redis_main_ms_per_image"),
            "redis_main_ms_per_image_reference": pick.get("reference", {}).get("redis_main_ms_per_image"),
            "images_per_s_one_redis_bytes": pick.get("bytes", {}).get("images_per_s_one_redis"),
            "images_per_s_one_redis_reference": pick.get("reference", {}).get("images_per_s_one_redis"),
        }
    result = {
        "benchmark": "redis_capacity",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine,
        "command": command,
        **by_job[job_sizes[0]],
        "by_job_size": list(by_job.values()),
        "images": args.images, "size": args.size, "fit_size": args.fit_size, "repeats": args.repeats, "pinned": pinned,
        "max_pending": args.max_pending,
        "aof": "everysec",
        "engine": "pointwise 1x1 convolution stand-in (ONNX, CPU): the worker goes as fast as decoding allows",
        "runs": rows,
        "versions": {**versions(redis_bin), "python": platform.python_version()},
    }
    sizes = "_".join(str(j) for j in job_sizes)
    path = args.out_json or ROOT / "benchmarks" / "results" / f"redis_capacity_jobs{sizes}_{now:%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {path}")
    print(f"Redis main thread per image ({machine}), {args.images} images {args.size}px, AOF on")
    print(f"{'mode':>10}{'jobs of':>9}{'img/s run':>11}{'main ms/img':>13}{'net in B/img':>14}{'AOF B/img':>11}"
          f"{'img/s one Redis':>17}")
    for row in rows:
        print(f"{row['mode']:>10}{row['job_size']:>9}{row['img_s']:>11}{row['redis_main_ms_per_image']:>13.4f}"
              f"{row['redis_net_in_bytes_per_image']:>14}{row['aof_bytes_per_image']:>11}"
              f"{row['images_per_s_one_redis'] or 0:>17}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
