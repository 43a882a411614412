"""Large images with the real commands: Dice of --fit tile against --fit resize, and throughput per tile against
throughput per engine-sized image, in the same run on the same Redis and worker settings.

    python benchmarks/tiling.py --engine engines/demo/unet_w16.onnx --device cpu --plain 32 --large 2
    python benchmarks/tiling.py --engine unet_fp16.ptc --device cuda --plain 4000 --large 200

Every step is a separate process (`python -m producer ...`, `python -m worker.cli ...`), on one private
`redis-server` with AOF on (everysec). Files are synthetic (`toolchain.synth`, exact masks): --distinct
images of each size, copied under as many names as asked.

1. Dice: --dice-images large images (--large-size, default 2048x1536) enqueued with `--fit tile` and with
   `--fit resize`, each on its own queue, one `worker run --burst`, `producer collect`; mean Dice of the
   collected masks against the exact masks.
2. Throughput: --plain images at the engine's size, then --large large images (their tiles), each on a
   fresh queue, fully enqueued before one `worker run --burst --log-file` starts (the worker never waits for
   input). Engine inputs per second from its `batch` lines: inputs of every batch after the first, over the
   time from the first batch's end to the last's. The two are run --repeats times, alternating which goes
   first; the ratio tiles/s over images/s is the figure (the issue's bar: within 5 %).

Writes benchmarks/results/tiling_<device>_<timestamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale_out import BenchError, Children, events, redis_binary, run, stamp, start_redis, versions  # noqa: E402

from common.metrics import dice  # noqa: E402
from engines.loader import read_spec  # noqa: E402
from toolchain.synth import generate, parse_size, read_mask  # noqa: E402

PRODUCER = [sys.executable, "-m", "producer"]
WORKER = [sys.executable, "-m", "worker.cli"]


def write_images(folder: Path, truth: Path | None, count: int, size: tuple[int, int], distinct: int,
                 seed: int) -> None:
    """`count` PNG files under folder (copies of `distinct` rendered images), their exact masks under truth."""
    folder.mkdir(parents=True, exist_ok=True)
    rendered = []
    for index, (image, mask) in enumerate(generate(min(count, distinct), size, seed)):
        path = folder / f"img_{index:05d}.png"
        Image.fromarray(image).save(path)
        rendered.append(path)
        if truth is not None:
            truth.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask * np.uint8(255)).save(truth / path.name)
    for index in range(len(rendered), count):
        shutil.copyfile(rendered[index % len(rendered)], folder / f"img_{index:05d}.png")


def process(args: argparse.Namespace, url: str, queue: str, folder: Path, fit: str, log: Path | None,
            out: Path | None) -> None:
    """enqueue folder on a fresh queue, run one worker until it is empty, collect into out (if given)."""
    common = ["--redis-url", url, "--queue", queue]
    run([*PRODUCER, "enqueue", str(folder), "--size", str(args.size), "--fit", fit, "--job-size", "8", *common],
        args.timeout, f"enqueue {folder.name} ({fit})")
    logs = ["--log-file", str(log)] if log is not None else []
    run([*WORKER, "run", "--engine", str(args.engine), "--device", args.device, "--burst", *logs, *common],
        args.timeout, f"worker on {folder.name}")
    if out is not None:
        run([*PRODUCER, "collect", "--out", str(out), "--delete", *common], args.timeout, "collect")


def inputs_per_second(log: Path) -> dict[str, float]:
    """Engine inputs per second over the worker's batches after its first (inputs, seconds, batches)."""
    batches = sorted(events(log, "batch"), key=stamp)
    if len(batches) < 3:
        raise BenchError(f"{log}: only {len(batches)} batches; give more images")
    inputs = sum(int(b["batch_size"]) for b in batches[1:])
    seconds = stamp(batches[-1]) - stamp(batches[0])
    return {"inputs": inputs, "seconds": round(seconds, 3), "batches": len(batches),
            "inputs_per_s": round(inputs / seconds, 2), "tiles": sum(int(b.get("tiles", 0)) for b in batches)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", type=Path, default=ROOT / "engines" / "demo" / "unet_w16.onnx")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plain", type=int, default=32, help="engine-sized images for the throughput phase")
    parser.add_argument("--large", type=int, default=2, help="large images for the throughput phase")
    parser.add_argument("--large-size", default="2048x1536", help="WIDTHxHEIGHT of the large images")
    parser.add_argument("--dice-images", type=int, default=1, help="large images for the Dice phase (0: skip)")
    parser.add_argument("--distinct", type=int, default=4, help="distinct rendered images per size")
    parser.add_argument("--repeats", type=int, default=1, help="throughput pairs, alternating the order")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    args.size = read_spec(args.engine).height
    large = parse_size(args.large_size)
    work = Path(tempfile.mkdtemp(prefix="tiling_bench_"))
    children = Children()
    result: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "machine": platform.node(),
                              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": args.device,
                              "engine": str(args.engine), "engine_size": args.size, "large_size": args.large_size}
    try:
        binary = redis_binary()
        url, _ = start_redis(binary, work / "redis", aof=True, io_threads=1, children=children)
        result["versions"] = versions(binary)
        if args.dice_images:
            write_images(work / "dice", work / "truth", args.dice_images, large, args.dice_images, args.seed)
            for fit in ("tile", "resize"):
                process(args, url, f"dice-{fit}", work / "dice", fit, None, work / f"masks-{fit}")
                scores = [dice(read_mask(work / f"masks-{fit}" / p.name).astype(bool), read_mask(p).astype(bool))
                          for p in sorted((work / "truth").iterdir())]
                result[f"dice_{fit}"] = round(float(np.mean(scores)), 4)
        write_images(work / "plain", None, args.plain, (args.size, args.size), args.distinct, args.seed + 1)
        write_images(work / "large", None, args.large, large, args.distinct, args.seed + 2)
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "large": []}
        for repeat in range(args.repeats):
            for kind in (("plain", "large") if repeat % 2 == 0 else ("large", "plain")):
                log = work / f"worker-{kind}-{repeat}.log"
                process(args, url, f"tp-{kind}-{repeat}", work / kind, "tile", log, None)
                runs[kind].append(inputs_per_second(log))
        result["throughput"] = runs
        plain = statistics.median(r["inputs_per_s"] for r in runs["plain"])
        tiles = statistics.median(r["inputs_per_s"] for r in runs["large"])
        result["images_per_s"], result["tiles_per_s"] = plain, tiles
        result["tile_to_image_ratio"] = round(tiles / plain, 4)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        children.kill_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    stamp_now = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    device = args.device.split(":")[0]
    out = ROOT / "benchmarks" / "results" / f"tiling_{device}_{socket.gethostname()}_{stamp_now}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"{'engine':<36}{args.engine.name} ({args.size} px, {args.device})")
    if "dice_tile" in result:
        print(f"{'Dice, ' + args.large_size + ', --fit tile':<36}{result['dice_tile']:.4f}")
        print(f"{'Dice, ' + args.large_size + ', --fit resize':<36}{result['dice_resize']:.4f}")
    print(f"{'engine-sized images/s':<36}{plain:.2f}")
    print(f"{'tiles/s (' + args.large_size + ')':<36}{tiles:.2f}")
    print(f"{'tiles/s over images/s':<36}{result['tile_to_image_ratio']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
