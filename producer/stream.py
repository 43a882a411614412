"""Backpressure and streaming for `producer enqueue`: this run's images that are still held in Redis.

An image is pending from the moment it is stored until it is collected: its mask written to a file
and its records freed (by this command with `--out`, or by anyone's `producer collect --delete`).
`--max-pending N` makes the enqueue wait while N images are pending, so a folder of any size moves
through a bounded amount of Redis memory. With `--out DIR` this object also collects: it writes the
mask of every image that has finished, through the producer pool, and frees it.

Pending is counted in records (engine inputs): an ordinary image is one, a tiled image or stack
(producer/tiling.py) is one per tile, and it leaves, all its tiles at once, when its stitched mask is
written. Each look at Redis checks the oldest pending files up to LOOK_AHEAD records (one or two
round trips), so its cost does not grow with the size of the folder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from itertools import islice
from pathlib import Path

from broker.store import QueueStore
from common.tiles import tile_id
from producer.collect import CollectReport, absorb
from producer.pool import ProducerPool
from producer.tiling import StoredUnit

LOOK_AHEAD = 2048  # records of the oldest pending files checked per look
COLLECT_CHUNK = 64  # images per collect task
STALL_WARNING_S = 30.0  # a wait with no image leaving for this long is reported (once per stall)


def stall_message(pending: int, stalled_s: float) -> str:
    """What a wait with nothing finishing says: likely no worker, and how to check."""
    return (f"waiting: no image has finished in {stalled_s:.0f} s ({pending} pending); no worker seems to have "
            "taken a job. Check with `producer status` (it counts live workers); start one with "
            "`worker run --engine FILE` (same --redis-url and --queue)")


class PendingImages:
    """Files of this run stored in Redis and not yet collected (id -> unit, oldest first); len() counts records.

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
        self._pending: dict[str, StoredUnit] = {}
        self._records = 0
        self._collecting: set[str] = set()
        self._tasks: list[tuple[list[str], Future]] = []
        self._last_look = 0.0

    def __len__(self) -> int:
        """Records (images and tiles) pending."""
        return self._records

    def add(self, stored: list[StoredUnit]) -> None:
        """Files just stored: an image, or a tiled image with its record count."""
        for unit in stored:
            self._pending[unit.unit_id] = unit
            self._records += unit.records

    def look(self) -> None:
        """Harvest finished collect tasks, then (at most every poll_s) look at Redis once."""
        self._harvest()
        if time.monotonic() - self._last_look < self.poll_s:
            return
        self._last_look = time.monotonic()
        candidates = self._oldest()
        if not candidates:
            return
        if self.out_dir is None:  # a tiled image is still stored while its first tile is
            firsts = [tile_id(i, 0) if self._pending[i].tiled else i for i in candidates]
            gone = [i for i, kept in zip(candidates, self.store.still_stored(firsts), strict=True) if not kept]
            self._drop(gone)
            return
        finished = [i for i, done in zip(candidates, self._resolved(candidates), strict=True) if done]
        for start in range(0, len(finished), COLLECT_CHUNK):
            chunk = finished[start:start + COLLECT_CHUNK]
            self._collecting.update(chunk)
            self._tasks.append((chunk, self.pool.submit_collect(chunk, self.out_dir, delete=True)))

    def _oldest(self) -> list[str]:
        """The oldest pending files not being collected, up to LOOK_AHEAD records (at least one file)."""
        chosen, records = [], 0
        for unit_id, unit in islice(self._pending.items(), LOOK_AHEAD):
            if records and records + unit.records > LOOK_AHEAD:
                break
            if unit_id not in self._collecting:
                chosen.append(unit_id)
                records += unit.records
        return chosen

    def _resolved(self, unit_ids: list[str]) -> list[bool]:
        """Whether each file has an outcome: an image its mask or failure, a tiled image every tile's (one round
        trip)."""
        records = [[tile_id(i, n) for n in range(self._pending[i].records)] if self._pending[i].tiled else [i]
                   for i in unit_ids]
        flags = iter(self.store.resolved([record for group in records for record in group]))
        return [all([next(flags) for _ in group]) for group in records]

    def wait_below(self, limit: int, deadline: float) -> bool:
        """Block until fewer than `limit` records are pending (True), or the monotonic deadline passes or stop is
        set (False)."""
        seen, since = len(self), time.monotonic()
        while len(self) >= limit:
            now = time.monotonic()
            if now > deadline or self._stop.is_set():
                return False
            if len(self) != seen:
                seen, since = len(self), now
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
            self._drop([i for i in chunk if i in self._pending and self._pending[i].name not in pending_names])
        self._tasks = running

    def _drop(self, unit_ids: list[str]) -> None:
        for unit_id in unit_ids:
            unit = self._pending.pop(unit_id, None)
            if unit is not None:
                self._records -= unit.records
        if unit_ids:
            self._on_collected(len(unit_ids))
