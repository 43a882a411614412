"""What travels between the worker's stages: images of claimed jobs, and batches handed to the engine."""

from __future__ import annotations

from dataclasses import dataclass

from broker.store import StoredImage
from worker.job_source import Claim


@dataclass(frozen=True)
class BatchItem:
    """One image of a claimed job, waiting in the batcher."""

    claim: Claim
    image_id: str


@dataclass(frozen=True)
class FetchedBatch:
    """A batch whose images are read: `items[i]` is `images[i]`; `rejected` failed before the engine.

    taken_at: monotonic seconds when it left the batcher. fetch_ms: reading its pixels from Redis.
    image_wait_ms: per image, enqueue to taken_at (wall clock).
    """

    items: list[BatchItem]
    images: list[StoredImage]
    rejected: list[tuple[BatchItem, str]]
    taken_at: float
    fetch_ms: float
    image_wait_ms: list[float]

    @property
    def all_items(self) -> list[BatchItem]:
        return self.items + [item for item, _ in self.rejected]

    @property
    def size(self) -> int:
        return len(self.items) + len(self.rejected)


@dataclass(frozen=True)
class MainThreadWaits:
    """Where the worker's main thread spent its time around one batch, ms (logged on the batch's line).

    claim_ms: claiming jobs or waiting for the claim thread's claim, and handover_ms: waiting for the writer
    thread to take computed batches, both since the previous batch went to the engine; fetch_wait_ms: waiting
    for this batch's images to be read and decoded; engine_wait_ms: waiting for its masks once the main thread
    asked for them. Much time in engine_wait_ms means the engine set the pace; in the others, the stage named.
    """

    claim_ms: float = 0.0
    handover_ms: float = 0.0
    fetch_wait_ms: float = 0.0
    engine_wait_ms: float = 0.0


def claims_of(items: list[BatchItem]) -> list[Claim]:
    """The distinct jobs these items belong to, in first-seen order."""
    claims: list[Claim] = []
    for item in items:
        if item.claim not in claims:
            claims.append(item.claim)
    return claims
