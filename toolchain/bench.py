"""Engine-only throughput: the one timing loop used by `engines bench`, toolchain.gpucheck and the scripts.

A timed run submits `iters` batches of the same images, keeping up to `engine.slots` batches in
flight (as a worker keeps them), and measures from the first submit to the last result. FPS is
images per second over that span: engine-only (no decoding, no Redis), uint8 images in, uint8 masks
out, normalization and argmax included (they are part of every engine).

Rows come in the seed study's table shape: variant, batch size, samples, runtime (s), FPS.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from engines.base import Engine, EngineError, EngineSpec

#: default samples (images) per engine and batch size
DEFAULT_SAMPLES = {"cpu": 32, "cuda": 1000}
#: default untimed warm-up batches
DEFAULT_WARMUP = {"cpu": 2, "cuda": 20}


def timed_run(engine: Engine, images: np.ndarray, iters: int, warmup: int = 2) -> float:
    """Seconds for `iters` batches of `images` (uint8 (N, H, W)) after `warmup` untimed batches.

    Up to `engine.slots` batches are in flight at once; the clock stops at the last result.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        engine.submit(images).result()
    flights = []
    start = time.perf_counter()
    for _ in range(iters):
        flights.append(engine.submit(images))
        if len(flights) >= max(1, engine.slots):
            flights.pop(0).result()
    for flight in flights:
        flight.result()
    return time.perf_counter() - start


def throughput(engine: Engine, images: np.ndarray, iters: int = 10, warmup: int = 2) -> float:
    """Images per second for repeated batches of `images` (uint8 (N, H, W)) after `warmup` batches."""
    return iters * len(images) / timed_run(engine, images, iters, warmup)


def bench_images(spec: EngineSpec, batch: int, seed: int = 0) -> np.ndarray:
    """A batch of synthetic uint8 images (batch, H, W) at the spec's input size."""
    from toolchain.synth import generate

    side = max(spec.height, spec.width)
    return np.stack([img[: spec.height, : spec.width] for img, _ in generate(batch, side, seed)])


@dataclass(frozen=True)
class BenchRow:
    """One engine at one batch size. runtime_s: seconds for `samples` images; fps = samples / runtime_s.

    runs: FPS of each round (the row reports their median).
    """

    variant: str
    batch: int
    samples: int
    runtime_s: float
    fps: float
    file: str = ""
    precision: str = ""
    runs: tuple[float, ...] = ()


def parse_batches(text: str) -> list[int]:
    """"1,4,8" -> [1, 4, 8]; ValueError on anything else."""
    try:
        sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"batch sizes must be integers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def bench_engines(
    engines: Sequence[tuple[str, Engine]],
    batches: Sequence[int],
    samples: int,
    warmup: int = 2,
    rounds: int = 1,
    file_names: Sequence[str] | None = None,
) -> list[BenchRow]:
    """Time every (variant, engine) at every batch size; rows in (engine, batch) order.

    samples: images per measurement, rounded up to whole batches. rounds: measurements per row,
    interleaved across engines (round 1 of every engine, then round 2, ...) so that a noisy machine
    disturbs all variants alike; the row's FPS is the median. Batch sizes above an engine's
    max_batch are skipped (no row).
    """
    if samples < 1 or rounds < 1:
        raise ValueError(f"samples and rounds must be >= 1, got {samples} and {rounds}")
    names = list(file_names) if file_names is not None else [""] * len(engines)
    fps: dict[tuple[int, int], list[float]] = {}
    images = {}
    for r in range(rounds):
        for batch in batches:
            for i, (_, engine) in enumerate(engines):
                if batch > engine.spec.max_batch or batch < engine.spec.min_batch:
                    continue
                key = (engine.spec.height, engine.spec.width, batch)
                if key not in images:
                    images[key] = bench_images(engine.spec, batch)
                iters = math.ceil(samples / batch)
                seconds = timed_run(engine, images[key], iters, warmup if r == 0 else min(warmup, 1))
                fps.setdefault((i, batch), []).append(iters * batch / seconds)
    rows = []
    for i, (variant, engine) in enumerate(engines):
        for batch in batches:
            runs = fps.get((i, batch))
            if not runs:
                continue
            n = math.ceil(samples / batch) * batch
            rate = statistics.median(runs)
            rows.append(BenchRow(variant, batch, n, n / rate, rate, names[i], engine.spec.precision,
                                 tuple(round(x, 3) for x in runs)))
    return rows


def format_table(rows: Sequence[BenchRow], extra: dict[str, Sequence[str]] | None = None) -> str:
    """The study's table: variant | batch size | samples | runtime (s) | FPS (+ extra columns)."""
    extra = extra or {}
    header = ["variant", "batch size", "samples", "runtime (s)", "FPS", *extra]
    body = [
        [r.variant, str(r.batch), str(r.samples), f"{r.runtime_s:.2f}", f"{r.fps:.2f}",
         *(col[i] for col in extra.values())]
        for i, r in enumerate(rows)
    ]
    widths = [max(len(h), *(len(line[c]) for line in body)) if body else len(h) for c, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths, strict=True))
    ) + " |"
    rule = "|" + "|".join("-" * (w + 2) if c == 0 else "-" * (w + 1) + ":" for c, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """{"host", "platform", "cpu", "cores"} of this machine."""
    return {"host": socket.gethostname(), "platform": platform.platform(), "cpu": cpu_model(),
            "cores": os.cpu_count()}


def gpu_name(device: str) -> str | None:
    """The CUDA device's name for a "cuda[:i]" device, else None."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return torch.cuda.get_device_name(index)
    except Exception as exc:  # no CUDA: the engines would not have loaded either
        raise EngineError(f"device {device}: cannot name the GPU ({exc})") from None


def report(rows: Sequence[BenchRow], command: str, device: str, **extra: object) -> dict[str, object]:
    """JSON-ready record: date (UTC), machine, GPU, versions, command, rows (+ extra keys)."""
    from engines.versions import built_with

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "gpu": gpu_name(device),
        "device": device,
        "versions": built_with(device),
        "command": command,
        "rows": [asdict(r) for r in rows],
        **extra,
    }
