"""Same-run A/B of `producer enqueue` alone and `producer collect --delete` between source trees (commits).

    python benchmarks/producer_ab.py --tree /work/wt-base --tree . --images 96 --rounds 7
    python benchmarks/producer_ab.py --tree A --tree B --no-collect --enqueue-arg=--max-pending=1000
    python benchmarks/producer_ab.py --tree A --tree B --no-collect --rgb

Measures what benchmarks/scale_out.py calls "producer alone" and its collect phase, with its helpers
and its command lines (one private redis-server, AOF everysec, --save ""; the same synthetic 512x512
PNGs; `python -m producer enqueue DIR --job-size 8 --size 512 --workers <CPUs>`, img/s over the
command's wall time, start-up included), for each tree in turn (the trees alternate, A B B A ..., so
that a noisy machine's drift falls on all alike), and prints the median of each. Beside img/s it
reports CPU ms per image: user + system time of the command and every process it started (its pool),
which a busy neighbour on a shared machine disturbs less than wall time.

--enqueue-arg adds arguments to `producer enqueue` (--max-pending N without --out: the producer counts
each file's records before storing it, and never waits with N >= --images). --rgb writes the files as
RGB PNGs, so that none is the engine input as it is and every file is decoded.

Each tree's commands run with the tree as their working directory (`python -m` puts it first on
sys.path), in this interpreter's environment: only the code differs. For collect, each tree first
enqueues the files and one CPU `worker run` of that tree finishes them; the Redis keys are then dumped,
and every collect round restores them (FLUSHALL + RESTORE) before `producer collect --out DIR --delete`.

Writes a JSON with every round's figures (--out-json) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
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
    start_redis,
    toolchain_module,
    write_files,
)


@dataclass(frozen=True)
class Timing:
    """One command's wall time and the CPU time (user + sys, s) of it and every process it started and reaped."""

    wall_s: float
    cpu_s: float


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], cwd: Path, timeout_s: float, what: str) -> tuple[Timing, str]:
    """Run argv in cwd to completion; (its Timing, stdout+stderr). BenchError if it fails."""
    cpu0 = _children_cpu_s()
    started = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise BenchError(f"{what} in {cwd}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return Timing(wall, _children_cpu_s() - cpu0), out.stdout + out.stderr


def rev(tree: Path) -> str:
    """The tree's commit (short hash), with '+dirty' when it has uncommitted changes to tracked files."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                           text=True).stdout.strip()
    return head.strip() + ("+dirty" if dirty else "")


class AB:
    """The trees, the Redis and the files shared by every round."""

    def __init__(self, args: argparse.Namespace, client: redis.Redis, url: str, files: Path, tmp: Path,
                 children: Children) -> None:
        self.args = args
        self.client = client
        self.url = url
        self.files = files
        self.tmp = tmp
        self.children = children
        self.py = sys.executable

    def common(self, queue: str) -> list[str]:
        return ["--redis-url", self.url, "--queue", queue]

    def enqueue_argv(self, queue: str) -> list[str]:
        return [self.py, *PRODUCER, "enqueue", str(self.files), "--job-size", str(self.args.job_size),
                "--size", "512", "--workers", str(self.args.workers), *self.args.enqueue_arg, *self.common(queue)]

    def enqueue_once(self, tree: Path) -> Timing:
        """One `producer enqueue` of the files on an empty Redis."""
        self.client.flushall()
        timing, out = timed(self.enqueue_argv("producer_only"), tree, 600, "producer enqueue")
        if f"enqueued {self.args.images} images" not in out:
            raise BenchError(f"{tree}: producer enqueue did not enqueue {self.args.images} images:\n{out[-2000:]}")
        self.client.flushall()
        return timing

    def finished_state(self, tree: Path) -> dict[bytes, tuple[bytes, int]]:
        """Enqueue the files and let one CPU worker of `tree` finish them; every key's DUMP and TTL."""
        self.client.flushall()
        queue = "collect_ab"
        timed(self.enqueue_argv(queue), tree, 600, "producer enqueue (for collect)")
        log = self.tmp / f"worker_{tree.name}.log"
        argv = [self.py, *WORKER, "run", "--engine", str(self.args.engine), "--device", "cpu",
                "--max-batch", "8", "--log-file", str(log), *self.common(queue)]
        with open(self.tmp / f"worker_{tree.name}.out", "ab") as out:
            worker = subprocess.Popen(argv, cwd=tree, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      process_group=0)
        self.children.processes.append(worker)
        deadline = time.monotonic() + 900
        while sum(e["images_ok"] for e in events(log, "batch")) < self.args.images:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"worker of {tree} exited or took too long; see {log}")
            time.sleep(0.5)
        time.sleep(1.0)  # the last batch's log line is written with its results; let the job's completion land
        worker.terminate()
        worker.wait(timeout=120)
        state: dict[bytes, tuple[bytes, int]] = {}
        for key in self.client.scan_iter(count=1000):
            dumped = self.client.dump(key)
            if dumped is not None:  # gone since the scan (an expiring key)
                state[key] = (dumped, self.client.pttl(key))
        return state

    def collect_once(self, tree: Path, state: dict[bytes, tuple[bytes, int]]) -> Timing:
        """Restore the finished state, then one `producer collect --out DIR --delete`."""
        self.client.flushall()
        with self.client.pipeline(transaction=False) as pipe:
            for key, (dumped, ttl) in state.items():
                pipe.restore(key, max(0, ttl), dumped)
            pipe.execute()
        out_dir = self.tmp / "masks"
        timing, text = timed([self.py, *PRODUCER, "collect", "--out", str(out_dir), "--delete",
                            "--workers", str(self.args.workers), *self.common("collect_ab")], tree, 600,
                           "producer collect")
        written = sum(1 for _ in out_dir.rglob("*.png"))
        shutil.rmtree(out_dir)
        if written != self.args.images:
            raise BenchError(f"{tree}: producer collect wrote {written} masks, expected {self.args.images}:\n"
                             f"{text[-2000:]}")
        self.client.flushall()
        return timing


def to_rgb(folder: Path) -> None:
    """Rewrite every PNG in folder as an RGB PNG of the same gray pixels (Pillow's default compression)."""
    from PIL import Image

    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        rgb.save(path)
    os.sync()


def describe(timing: Timing, images: int) -> str:
    return f"{images / timing.wall_s:.1f} img/s, {1000 * timing.cpu_s / images:.2f} CPU ms/img"


def summary(timings: list[Timing], images: int) -> dict[str, Any] | None:
    """Medians and every round of img/s (over wall time) and CPU ms per image (all the command's processes)."""
    if not timings:
        return None
    rates = [images / t.wall_s for t in timings]
    cpu = [1000 * t.cpu_s / images for t in timings]
    return {"img_s_median": round(statistics.median(rates), 1), "img_s": [round(x, 1) for x in rates],
            "cpu_ms_per_image_median": round(statistics.median(cpu), 2), "cpu_ms_per_image": [round(x, 2) for x in cpu]}


def alternating(trees: list[Path], rounds: int) -> list[Path]:
    """A B B A A B ...: each tree as often first as second."""
    order: list[Path] = []
    for r in range(rounds):
        order.extend(trees if r % 2 == 0 else trees[::-1])
    return order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", required=True, help="a source tree (give two)")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--job-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="producer --workers")
    parser.add_argument("--enqueue-arg", action="append", default=[],
                        help="one more argument for producer enqueue, e.g. --enqueue-arg=--max-pending=1000")
    parser.add_argument("--rgb", action="store_true",
                        help="write the files as RGB PNGs (not the engine input as they are: every file is decoded)")
    parser.add_argument("--collect", action=argparse.BooleanOptionalAction, default=True,
                        help="also time producer collect --delete (needs one CPU worker run per tree)")
    parser.add_argument("--engine", type=Path, default=ROOT / "engines" / "demo" / "unet_w16.onnx")
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree]
    args.engine = args.engine.resolve()
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="producer_ab_"))
    try:
        url, _ = start_redis(redis_binary(), tmp / "redis", aof=True, io_threads=1, children=children)
        client = redis.Redis.from_url(url, socket_timeout=60)
        subprocess.run([sys.executable, *toolchain_module(), "synth", str(tmp / "data"), "--n",
                        str(min(256, args.images)), "--size", "512"], cwd=ROOT, check=True, capture_output=True)
        files = write_files(tmp / "data" / "images", tmp / "parts", args.images, 1)[0]
        if args.rgb:
            to_rgb(files)
        bench = AB(args, client, url, files, tmp, children)
        enqueue: dict[Path, list[Timing]] = {tree: [] for tree in trees}
        for tree in alternating(trees, args.rounds):
            enqueue[tree].append(bench.enqueue_once(tree))
            print(f"enqueue {tree.name}: {describe(enqueue[tree][-1], args.images)}", flush=True)
        collect: dict[Path, list[Timing]] = {tree: [] for tree in trees}
        if args.collect:
            states = {tree: bench.finished_state(tree) for tree in trees}
            for tree in alternating(trees, args.rounds):
                collect[tree].append(bench.collect_once(tree, states[tree]))
                print(f"collect {tree.name}: {describe(collect[tree][-1], args.images)}", flush=True)
    finally:
        children.kill_all()
    result: dict[str, Any] = {
        "benchmark": "producer_ab",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "images": args.images,
        "job_size": args.job_size,
        "producer_workers": args.workers,
        "enqueue_args": args.enqueue_arg,
        "rgb_files": args.rgb,
        "rounds": args.rounds,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "trees": [{"tree": str(tree), "commit": rev(tree), "enqueue": summary(enqueue[tree], args.images),
                   "collect_delete": summary(collect[tree], args.images)} for tree in trees],
    }
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'commit':>14} {'command':>18} {'img/s (median)':>15} {'CPU ms/img (median)':>20}")
    for row in result["trees"]:
        for name in ("enqueue", "collect_delete"):
            if row[name]:
                print(f"{row['commit']:>14} {name:>18} {row[name]['img_s_median']:>15} "
                      f"{row[name]['cpu_ms_per_image_median']:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
