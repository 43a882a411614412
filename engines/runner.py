"""One background thread that runs a CPU engine's batches, so callers overlap I/O with compute."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from engines.base import EngineError


class BackgroundRunner:
    """Runs `fn(images) -> masks` on one worker thread; `submit` returns a Future (an InFlight).

    Exceptions other than EngineError raised by `fn` reach `Future.result()` as EngineError with
    `label` in the message. `close()` waits for queued batches and stops the thread; idempotent.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], label: str) -> None:
        self._fn = fn
        self._label = label
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"engine-{label[:20]}"
        )
        self._lock = threading.Lock()

    def _run(self, images: np.ndarray) -> np.ndarray:
        try:
            return self._fn(images)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"{self._label}: inference failed ({type(exc).__name__}: {exc})") from exc

    def submit(self, images: np.ndarray) -> Future:
        """Queue one batch; the Future's result() is the uint8 (N, H, W) masks."""
        with self._lock:
            if self._executor is None:
                raise EngineError(f"{self._label}: engine is closed")
            return self._executor.submit(self._run, images)

    def close(self) -> None:
        """Finish queued batches, then stop the thread."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
