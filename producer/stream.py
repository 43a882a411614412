"""Backpressure and streaming for `producer enqueue`: this run's images that are still held in Redis.

An image is pending from the moment it is stored until it is collected: its mask written to a file
and its records freed (by this command with `--out`, or by anyone's `producer collect --delete`).
`--max-pending N` makes the enqueue wait while N images are pending, so a folder of any size moves
through a bounded amount of Redis memory. With `--out DIR` this object also collects: it writes the
mask of every image that has finished, through the producer pool, and frees it.

Each look at Redis checks at most LOOK_AHEAD of the oldest pending images (one or two round
trips), so its cost does not grow with the size of the folder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from itertools import islice
from pathlib import Path

from broker.store import QueueStore
from producer.collect import CollectReport, absorb
from producer.pool import ProducerPool

LOOK_AHEAD = 2048  # oldest pending images checked per look
COLLECT_CHUNK = 64  # images per collect task
STALL_WARNING_S = 30.0  # a wait with no image leaving for this long is reported (once per stall)


def stall_message(pending: int, stalled_s: float) -> str:
    """What a wait with nothing finishing says: likely no worker, and how to check."""
    return (f"waiting: no image has finished in {stalled_s:.0f} s ({pending} pending); no worker seems to have "
            "taken a job. Check with `producer status` (it counts live workers); start one with "
            "`worker run --engine FILE` (same --redis-url and --queue)")


class PendingImages:
    """Images of this run stored in Redis and not yet collected (id -> name, oldest first).

    out_dir None: only watch (images leave when someone else collects them). Else write each
    finished mask under out_dir and free it; failed images are reported and leave Redis untouched
    (as `producer collect` does). `on_collected(n)` is called as masks are written or failures seen.
    A wait (wait_below, drain) in which no image leaves for stall_warning_s seconds calls
    `on_stall(stall_message(...))` once, and again after each further stall_warning_s without progress.
    Setting `stop` (Ctrl-C) ends a wait at once, as a timeout does.
    """

    def __init__(self, store: QueueStore, pool: ProducerPool, out_dir: Path | None,
                 on_collected: Callable[[int], None] = lambda n: None, poll_s: float = 0.2,
                 stall_warning_s: float = STALL_WARNING_S, on_stall: Callable[[str], None] = lambda message: None,
                 stop: threading.Event | None = None) -> None:
        self.store = store
        self.pool = pool
        self.out_dir = out_dir
        self.poll_s = poll_s
        self.stall_warning_s = stall_warning_s
        self._on_stall = on_stall
        self._stop = stop or threading.Event()
        self.report = CollectReport()
        self._on_collected = on_collected
        self._pending: dict[str, str] = {}
        self._collecting: set[str] = set()
        self._tasks: list[tuple[list[str], Future]] = []
        self._last_look = 0.0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, stored: list[tuple[str, str]]) -> None:
        """Images just stored: (image_id, name) pairs."""
        self._pending.update(stored)

    def look(self) -> None:
        """Harvest finished collect tasks, then (at most every poll_s) look at Redis once."""
        self._harvest()
        if time.monotonic() - self._last_look < self.poll_s:
            return
        self._last_look = time.monotonic()
        candidates = [i for i in islice(self._pending, LOOK_AHEAD) if i not in self._collecting]
        if not candidates:
            return
        if self.out_dir is None:
            gone = [i for i, kept in zip(candidates, self.store.still_stored(candidates), strict=True) if not kept]
            self._drop(gone)
            return
        finished = [i for i, done in zip(candidates, self.store.resolved(candidates), strict=True) if done]
        for start in range(0, len(finished), COLLECT_CHUNK):
            chunk = finished[start:start + COLLECT_CHUNK]
            self._collecting.update(chunk)
            self._tasks.append((chunk, self.pool.submit_collect(chunk, self.out_dir, delete=True)))

    def wait_below(self, limit: int, deadline: float) -> bool:
        """Block until fewer than `limit` images are pending (True), or the monotonic deadline passes or stop is set
        (False)."""
        seen, since = len(self._pending), time.monotonic()
        while len(self._pending) >= limit:
            now = time.monotonic()
            if now > deadline or self._stop.is_set():
                return False
            if len(self._pending) != seen:
                seen, since = len(self._pending), now
            elif now - since >= self.stall_warning_s:
                self._on_stall(stall_message(seen, now - since))
                since = now
            self.look()
            time.sleep(self.poll_s / 4)
        return True

    def drain(self, deadline: float) -> bool:
        """Block until nothing is pending (True) or the monotonic deadline passes (False)."""
        return self.wait_below(1, deadline)

    def _harvest(self) -> None:
        running = []
        for chunk, task in self._tasks:
            if not task.done():
                running.append((chunk, task))
                continue
            report: CollectReport = task.result()  # a task's own exception (disk full, Redis gone) ends the run
            absorb(self.report, report)
            self._collecting.difference_update(chunk)
            pending_names = set(report.pending)
            self._drop([i for i in chunk if self._pending.get(i) not in pending_names])
        self._tasks = running

    def _drop(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            self._pending.pop(image_id, None)
        if image_ids:
            self._on_collected(len(image_ids))
