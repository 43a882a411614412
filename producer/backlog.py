"""`producer enqueue`'s part of the autoscaling signal: how many of its files it has not stored yet.

A `BacklogReporter` writes that number (broker/backlog.py) when the files are found, then from a thread
of its own: within `min_interval_s` of a change (one round trip or two per second at most, whatever the
rate of files) and every `interval_s` regardless, so the record stays fresh while the run waits for
room under `--max-pending`. The record expires `ttl_periods` intervals after its last write (a killed producer
stops counting) and is deleted when the run ends.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import redis

from broker.backlog import forget_producer, record_to_send

REPORT_INTERVAL_S = 5.0
MIN_INTERVAL_S = 0.5


class BacklogReporter:
    """Counts this run's files found and handled (stored or rejected) and keeps its record in Redis. A context
    manager: the record is deleted on exit."""

    def __init__(self, client: redis.Redis, queue: str, interval_s: float = REPORT_INTERVAL_S,
                 ttl_periods: float = 3.0, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.client = client
        self.queue = queue
        self.interval_s = interval_s
        self.ttl_s = interval_s * ttl_periods
        self.min_interval_s = min_interval_s
        self._written_left: int | None = None
        self._written_at = 0.0
        self.producer_id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._found = 0
        self._handled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_fresh, name="backlog", daemon=True)

    @property
    def files_left(self) -> int:
        """Files found and not yet stored or rejected."""
        with self._lock:
            return max(0, self._found - self._handled)

    def found(self, files: int) -> None:
        """The run found `files` image files: record them at once, then keep the record fresh."""
        with self._lock:
            self._found = files
        self._write()
        if not self._thread.is_alive():
            self._thread.start()

    def handled(self, files: int) -> None:
        """`files` more files were stored or rejected (written at the next period)."""
        with self._lock:
            self._handled += files

    def _write(self) -> None:
        left = self.files_left
        try:
            record_to_send(self.client, self.queue, self.producer_id, left, self.ttl_s)
        except redis.RedisError:  # the enqueue itself reports a Redis outage; the record is refreshed later
            return
        self._written_left, self._written_at = left, time.monotonic()

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self.min_interval_s):
            if self.files_left != self._written_left or time.monotonic() - self._written_at >= self.interval_s:
                self._write()

    def __enter__(self) -> BacklogReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            forget_producer(self.client, self.queue, self.producer_id)
        except redis.RedisError:  # expires on its own after ttl_s
            pass
