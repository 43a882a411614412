"""Small helpers the tests share: bounded waiting, reading the worker's JSON log, a fake clock for metrics.

Nothing here starts a process or a server.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.05


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str | Callable[[], str],
               process: subprocess.Popen | None = None) -> None:
    """Poll `predicate` until true; fail naming `what` (a string, or a callable giving one) after `timeout_s`,
    or at once if `process` exits meanwhile (with its output)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"exited with {process.returncode} while waiting for {_text(what)}: {output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {_text(what)}")
        time.sleep(POLL_S)


def _text(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def log_events(log_file: Path, event: str) -> list[dict]:
    """The JSON log records of one event in a worker's log file (none if it does not exist yet; a line still
    being written is skipped)."""
    if not log_file.exists():
        return []
    records = []
    for line in log_file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [record for record in records if isinstance(record, dict) and record.get("event") == event]


class FakeClock:
    """A clock the test moves by hand: `clock()` returns `clock.now` (seconds)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
