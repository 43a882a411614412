"""Stop requests: SIGTERM or SIGINT (Ctrl-C, or rq's `shutdown` command, which sends SIGINT).

The first signal asks the worker to finish the work it has claimed and stop; a second one exits at
once, with status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), without waiting for
the batches in flight, the result writer or the engine: the claimed jobs are then re-enqueued by
another worker after their heartbeat TTL. The handlers are installed for the life of a
`with stop_on_signals()` block and restored after it.
"""

from __future__ import annotations

import os
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
            exit_now(signum)


def exit_now(signum: int) -> None:
    """End the process at once with status 128 + signum, saying so on stderr.

    os._exit, not SystemExit: SystemExit would unwind through every `finally` (drain the result
    writer, wait for the engine's batches in flight, join threads), which is exactly the wait a
    second signal asks to skip. os.write, not logging: a handler must not take locks the
    interrupted code may hold.
    """
    name = signal.Signals(signum).name
    message = (f"worker: second {name}: exiting now; the jobs it had claimed are re-enqueued after "
               "their heartbeat TTL\n")
    try:
        os.write(2, message.encode())
    finally:
        os._exit(128 + signum)


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
