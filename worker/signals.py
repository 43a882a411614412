"""Stop requests: SIGTERM or SIGINT (Ctrl-C, or rq's `shutdown` command, which sends SIGINT).

The first signal asks the worker to finish the work it has claimed and stop; a second one exits at
once (the claimed jobs are then re-enqueued by another worker after their heartbeat TTL). The
handlers are installed for the life of a `with stop_on_signals()` block and restored after it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType


@dataclass
class StopFlag:
    """Set when the worker has been asked to stop; `signals` counts the requests."""

    signals: int = 0

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def request(self) -> None:
        """Ask for a clean stop (what the first signal does)."""
        self.signals += 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request()
        if self.signals > 1:
            raise SystemExit(128 + signum)


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install SIGTERM/SIGINT handlers that set a StopFlag; the previous handlers come back on exit."""
    flag = StopFlag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, flag._on_signal)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
