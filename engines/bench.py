"""Engine-only throughput: a timing loop that keeps `engine.slots` batches in flight."""

from __future__ import annotations

import time

import numpy as np

from engines.base import Engine


def throughput(engine: Engine, images: np.ndarray, iters: int = 10, warmup: int = 2) -> float:
    """Images per second for repeated batches of `images` (uint8 (N, H, W)) after `warmup` batches.

    Up to `engine.slots` batches are in flight at once, as a worker would keep them.
    """
    for _ in range(warmup):
        engine.submit(images).result()
    start = time.perf_counter()
    flights = []
    for _ in range(iters):
        flights.append(engine.submit(images))
        if len(flights) >= engine.slots:
            flights.pop(0).result()
    for flight in flights:
        flight.result()
    return iters * len(images) / (time.perf_counter() - start)
