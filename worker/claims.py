"""The jobs a worker holds open, shared by the main loop (claims, heartbeats) and the writer thread (completes)."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from worker.job_source import Claim


class OpenClaims:
    """A thread-safe set of open claims. `close()` is the one place a claim stops being open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Claim] = []

    def add(self, claim: Claim) -> None:
        with self._lock:
            self._open.append(claim)

    def snapshot(self) -> list[Claim]:
        """The open claims now (a copy, safe to iterate while others change the set)."""
        with self._lock:
            return list(self._open)

    def complete(self) -> list[Claim]:
        """Open claims whose every image has an outcome."""
        with self._lock:
            return [claim for claim in self._open if claim.complete]

    def close(self, claim: Claim) -> bool:
        """Mark a claim closed; True for the one caller that closed it, False if it already was."""
        with self._lock:
            if claim.closed:
                return False
            claim.closed = True
            self._open = [c for c in self._open if c is not claim]
            return True

    def close_all(self, claims: Iterable[Claim]) -> list[Claim]:
        """Close these claims (an abandoned job is no longer heartbeated, so rq re-enqueues it after its
        heartbeat TTL); the ones this call closed."""
        return [claim for claim in claims if self.close(claim)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)
