"""The worker's seam to its job queue: claim jobs, keep them alive, complete or fail them.

The pipeline and the writer thread see only this interface and the project's own `Claim` objects;
`worker/rq_source.py` is the one adapter (with the rq worker it runs, worker/rq_worker.py: the worker's only
rq files). Tests
drive the pipeline and the writer through an in-memory source (tests/integration/fake_jobs.py), the way the
batcher is tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

# Writes a batch's image outcomes (QueueStore.save_results): queued on the given pipeline, or sent itself (None).
ResultWrites = Callable[[redis.client.Pipeline | None], None]


@dataclass(frozen=True)
class ImageOutcome:
    """What became of one image of a job: a mask was written (`ok`), or `error` says why not."""

    image_id: str
    ok: bool
    name: str = ""
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        """The JSON form stored as part of the job's result."""
        if self.ok:
            return {"image": self.image_id, "name": self.name, "ok": True}
        return {"image": self.image_id, "ok": False, "error": self.error}


@dataclass(eq=False)
class Claim:
    """A job this worker holds: its id, its image ids, and the outcome of each image so far.

    `handle` is the adapter's own state for the job (opaque to everyone else). `closed` is set only
    by `worker.claims.OpenClaims.close()`: a closed claim is no longer heartbeated or completed.
    `records`: image records the source read with the claim, by image id (QueueStore.read_references:
    images enqueued by reference), so that the loader need not read them again; others are read when fetched.
    """

    job_id: str
    image_ids: list[str]
    handle: Any = None
    outcomes: dict[str, ImageOutcome] = field(default_factory=dict)
    closed: bool = False
    records: dict[str, dict[bytes, bytes]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True once every image has an outcome."""
        return len(self.outcomes) == len(self.image_ids)

    @property
    def any_ok(self) -> bool:
        """True if at least one image got a mask."""
        return any(outcome.ok for outcome in self.outcomes.values())

    def result(self) -> dict[str, Any]:
        """The job's result: per-image outcomes, in the job's image order."""
        return {"images": [self.outcomes[image_id].as_json() for image_id in self.image_ids]}

    def failure_reason(self) -> str:
        """One line naming every distinct reason this job's images failed."""
        reasons = sorted({o.error for o in self.outcomes.values() if not o.ok})
        return "every image of this job failed: " + "; ".join(reasons)


class JobSource(Protocol):
    """Where a worker's jobs come from and where their outcomes go. Safe to call from two threads
    (the main loop claims and heartbeats, the writer thread completes)."""

    name: str

    def claim(self, max_jobs: int, timeout_s: float) -> list[Claim]:
        """Start up to `max_jobs` queued jobs; wait at most `timeout_s` for the first (0: don't wait).

        Returns [] when the queue stayed empty. A job whose arguments are unusable is failed by the
        source itself (no retry) and not returned.
        """

    def keep_alive(self, claims: Sequence[Claim]) -> None:
        """Extend the worker's and these jobs' heartbeats (jobs not kept alive are re-enqueued)."""

    def maintain(self) -> None:
        """Run the queue's housekeeping if it is due (re-enqueues jobs of dead workers)."""

    def complete(self, claims: Sequence[Claim], results: ResultWrites | None = None) -> None:
        """Complete jobs whose every image has an outcome, all in one round trip: finished with
        `claim.result()` if any image succeeded, else failed without retry. `results` writes a batch's
        image outcomes: queued on the source's Redis pipeline (one round trip with the completions),
        or, called with None, on its own."""

    def fail(self, claims: Sequence[Claim], reason: str, retry: bool) -> None:
        """Fail jobs with `reason`; they are retried later if `retry` and retries are left."""
