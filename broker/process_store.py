"""A pool of forked processes, each with its own Redis connection and `QueueStore`, for producer and worker.

The producer (producer/pool.py: decode-and-store, write-masks) and the worker (worker/loader.py: fetch
and decode a batch's images) both run CPU-bound work on Redis data in processes of their own: one
process has one GIL. `fork_store_pool` builds the `ProcessPoolExecutor` both use. Each child opens one
Redis connection and one `QueueStore` when it starts; a task reaches it with `process_store()`, so
only the task's arguments and its small result cross between processes (pickled by our own code:
nothing read from Redis is unpickled).

Children are forked where the platform can (they start in milliseconds and inherit the imports), and
all of them when the pool is built, not at their first task. Every child ignores SIGINT: Ctrl-C
reaches the whole process group, and the parent handles it (the producer finishes the chunks in
flight; the worker drains), so a child neither dies mid-task nor prints a KeyboardInterrupt
traceback. SIGTERM keeps its default action: the process pool uses it to stop the others when one
dies. The caller's `prepare` hook runs next, before the connection opens (the producer lowers its
children's CPU priority; the worker's children die with the worker).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from broker.connection import BrokerSettings, connect
from broker.store import QueueStore

# --- inside a pool process ---------------------------------------------------------------------

_process_store: QueueStore | None = None


def _no_preparation() -> None:
    """The default `prepare` hook: nothing beyond the signal settings."""


def _start_child(settings: BrokerSettings, prepare: Callable[[], object]) -> None:
    """Pool initializer: leave Ctrl-C to the parent, keep SIGTERM's default, run `prepare`, connect to Redis."""
    global _process_store
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    prepare()
    _process_store = QueueStore(connect(settings), settings.queue)


def process_store() -> QueueStore:
    """This pool process's own QueueStore (for tasks run by a `fork_store_pool` executor)."""
    if _process_store is None:
        raise RuntimeError("pool process started without its Redis store")
    return _process_store


# --- in the parent -----------------------------------------------------------------------------


def fork_store_pool(settings: BrokerSettings, processes: int, prepare: Callable[[], object] = _no_preparation,
                    *, wait: bool = False) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor of `processes` children, each with its own Redis store, all started now.

    `prepare` runs first in each child, after the signal settings and before the connection opens
    (a module-level function or a functools.partial of one). With wait=False the children fork and
    connect while the caller goes on; with wait=True this returns once every child has started and
    connected, and raises BrokenProcessPool (after stopping the pool) when one could not.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method),
                                   initializer=_start_child, initargs=(settings, prepare))
    if not wait:  # the first task forks every child (a fork pool starts them all at once)
        executor.submit(os.getpid)
        return executor
    try:
        for future in [executor.submit(os.getpid) for _ in range(processes)]:
            future.result()
    except BrokenProcessPool:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    return executor
