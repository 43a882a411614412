"""Size-or-deadline batching, with no knowledge of Redis or devices (testable with a fake clock).

Items wait in arrival order. A batch is ready when `max_batch` items wait, or when the oldest has
waited `max_wait_s`. The remaining wait is recomputed from the oldest item on every call.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """A FIFO of items with arrival times; `take()` returns up to `max_batch` of the oldest."""

    def __init__(self, max_batch: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: deque[tuple[float, T]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Append an item, stamped with the current time."""
        self._items.append((self._clock(), item))

    def time_left(self) -> float:
        """Seconds until the oldest item's deadline: 0 when a batch is ready, inf when empty."""
        if not self._items:
            return math.inf
        if len(self._items) >= self.max_batch:
            return 0.0
        waited = self._clock() - self._items[0][0]
        return max(0.0, self.max_wait_s - waited)

    def ready(self) -> bool:
        """True when a full batch waits or the oldest item's deadline has passed."""
        return bool(self._items) and self.time_left() == 0.0

    def take(self) -> list[T]:
        """Remove and return up to `max_batch` of the oldest items (regardless of readiness)."""
        count = min(self.max_batch, len(self._items))
        return [self._items.popleft()[1] for _ in range(count)]
