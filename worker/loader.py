"""Reading a batch's images from Redis and decoding them, in processes of their own.

A fast GPU needs several cores of decoding (PNG payloads above all), and threads cannot give it them:
Pillow releases the GIL while it inflates but parses each file holding it, and the worker's busy
threads share one GIL (the measurements are in docs/worker-measurements.md). `ProcessImageLoader` runs
`QueueStore.load_images` in `processes` forked children (broker/process_store.py), each with its own
Redis connection and its own GIL; only the decoded pixels come back (pickled by our own child: nothing
read from Redis is unpickled).

The children are forked when the loader starts, before the engine loads (no CUDA context, no other
threads yet). They ignore SIGINT (Ctrl-C reaches the whole process group; the worker drains with them)
but not SIGTERM, which the process pool uses to stop the others when one dies; SIGTERM for the worker
is sent to its pid (the worker pool, Docker and Kubernetes do). Linux sends them SIGTERM when the worker
dies (PR_SET_PDEATHSIG, as the worker pool does for its children), so a SIGKILLed worker leaves none behind.
`ThreadImageLoader` decodes on the calling thread (processes=0, tests of the pipeline alone).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Protocol

from broker.connection import BrokerSettings
from broker.errors import SegqueueError
from broker.process_store import fork_store_pool, process_store
from broker.store import QueueStore, StoredImage
from worker.mask_files import MaskFile, write_mask_files
from worker.pool import die_with_parent

Records = Mapping[str, dict[bytes, bytes]]  # image records read with their claims, by id (Claim.records)


class LoaderDied(SegqueueError):
    """A decode process died (killed, out of memory): the worker cannot fetch images any more."""


class ImageLoader(Protocol):
    """Reads and decodes images by id: each entry is the image or why it cannot be used (as QueueStore.load_images).

    processes: how many loads run at once beside the worker's threads (decode processes; 0 for none)."""

    processes: int

    def load(self, image_ids: Sequence[str], records: Records | None = None) -> list[StoredImage | str]:
        """`image_ids` read (but those with a record in `records`, read with their claim) and decoded."""
        ...

    def write_masks(self, files: Sequence[MaskFile]) -> list[str | None]:
        """Write masks of images enqueued by reference (worker/mask_files.py): per file None or why not."""
        ...

    def close(self) -> None: ...


class ThreadImageLoader:
    """Loads on the calling thread through the worker's own QueueStore."""

    processes = 0

    def __init__(self, store: QueueStore) -> None:
        self.store = store

    def load(self, image_ids: Sequence[str], records: Records | None = None) -> list[StoredImage | str]:
        """Fetch (at most one round trip) and decode `image_ids`, on this thread."""
        return self.store.load_images(image_ids, records)

    def write_masks(self, files: Sequence[MaskFile]) -> list[str | None]:
        """Write the masks on this thread."""
        return write_mask_files(files)

    def close(self) -> None:
        """Nothing to release."""


# --- inside a decode process ------------------------------------------------------------------


def _die_with_worker(worker: int) -> None:
    """Decode-process `prepare` hook: die with the worker (and exit now if it is already gone)."""
    die_with_parent()
    if os.getppid() != worker:  # the worker died before the line above took effect
        os._exit(0)


def _load_task(image_ids: list[str], records: Records | None) -> list[StoredImage | str]:
    return process_store().load_images(image_ids, records)


# --- in the worker ----------------------------------------------------------------------------


class ProcessImageLoader:
    """Loads in `processes` forked decode processes; `load` blocks the calling (fetch) thread only.

    Create it before the engine is loaded and before any thread starts: it forks at once. Redis
    errors in a child reach the caller as the same redis exceptions; a child's death raises
    LoaderDied.
    """

    def __init__(self, settings: BrokerSettings, processes: int) -> None:
        self.processes = processes
        try:  # fork now and check that each one connected
            self._executor = fork_store_pool(settings, processes, partial(_die_with_worker, os.getpid()), wait=True)
        except BrokenProcessPool:
            raise LoaderDied("the decode processes could not start (see the error above)") from None

    def load(self, image_ids: Sequence[str], records: Records | None = None) -> list[StoredImage | str]:
        """Fetch (at most one round trip) and decode `image_ids`, in a decode process."""
        try:
            return self._executor.submit(_load_task, list(image_ids), dict(records) if records else None).result()
        except BrokenProcessPool:
            raise LoaderDied("a decode process died (killed or out of memory); the worker stops and its "
                             "jobs are taken up again") from None

    def write_masks(self, files: Sequence[MaskFile]) -> list[str | None]:
        """Write the masks spread over the decode processes (PNG encoding is CPU work), waiting for all."""
        if not files:
            return []
        share = -(-len(files) // self.processes)
        try:
            tasks = [self._executor.submit(write_mask_files, list(files[start:start + share]))
                     for start in range(0, len(files), share)]
            return [reason for task in tasks for reason in task.result()]
        except BrokenProcessPool:
            raise LoaderDied("a decode process died (killed or out of memory); the worker stops and its "
                             "jobs are taken up again") from None

    def close(self) -> None:
        """Stop the decode processes (after the loads already asked for)."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def open_loader(settings: BrokerSettings, processes: int, store: QueueStore) -> ImageLoader:
    """A ProcessImageLoader with `processes` children, or a ThreadImageLoader on `store` when processes is 0."""
    if processes == 0:
        return ThreadImageLoader(store)
    return ProcessImageLoader(settings, processes)
