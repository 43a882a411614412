"""An in-memory job source for unit tests of the worker's pipeline and writer (no rq, no job queue).

It stands in for the seam `worker.job_source.JobSource` only; images, masks and engines stay real.
It records every call, so a test can assert which jobs were completed, failed or kept alive.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

from worker.job_source import Claim, ResultWrites


class FakeJobSource:
    """Jobs given as lists of image ids, claimed in order; completions and failures are recorded."""

    name = "fake-worker"

    def __init__(self, jobs: list[list[str]], on_claim: Callable[[list[Claim]], None] = lambda claims: None) -> None:
        self._lock = threading.Lock()
        self._queued: deque[Claim] = deque(Claim(f"job{i}", list(ids)) for i, ids in enumerate(jobs))
        self._on_claim = on_claim
        self.claimed: list[Claim] = []
        self.claim_sizes: list[int] = []  # jobs returned by each claim call
        self.completed: list[Claim] = []
        self.complete_calls = 0
        self.failed: list[tuple[Claim, str, bool]] = []
        self.kept_alive: list[list[str]] = []
        self.heartbeats_after_completion: list[str] = []
        self.maintained = 0
        self.fail_completions_with: Exception | None = None
        self.completion_sizes: list[int] = []  # jobs of each complete call
        self.completing = threading.Event()  # set when a complete call begins
        self.complete_gate: threading.Event | None = None  # if set, complete calls wait for it (up to gate_timeout_s)
        self.gate_timeout_s = 10.0

    def claim(self, max_jobs: int, timeout_s: float) -> list[Claim]:
        with self._lock:
            claims = [self._queued.popleft() for _ in range(min(max_jobs, len(self._queued)))]
            self.claimed.extend(claims)
            self.claim_sizes.append(len(claims))
        if claims:
            self._on_claim(claims)
        return claims

    def keep_alive(self, claims: Sequence[Claim]) -> None:
        with self._lock:
            alive = [claim.job_id for claim in claims if not claim.closed]
            self.kept_alive.append(alive)
            done = {claim.job_id for claim in self.completed}
            self.heartbeats_after_completion.extend(job_id for job_id in alive if job_id in done)

    def maintain(self) -> None:
        with self._lock:
            self.maintained += 1

    def complete(self, claims: Sequence[Claim], results: ResultWrites | None = None) -> None:
        self.completing.set()
        if self.complete_gate is not None:
            self.complete_gate.wait(self.gate_timeout_s)
        if self.fail_completions_with is not None:
            raise self.fail_completions_with
        if results is not None:  # no pipeline here: the results go on their own
            results(None)
        with self._lock:
            self.complete_calls += 1
            self.completion_sizes.append(len(claims))
            self.completed.extend(claims)

    def fail(self, claims: Sequence[Claim], reason: str, retry: bool) -> None:
        with self._lock:
            self.failed.extend((claim, reason, retry) for claim in claims)
