"""`producer enqueue SOURCE --by-reference --out DEST`: enqueue images by location; workers read them and write masks.

SOURCE is a folder every worker sees at the same path, or an fsspec URL prefix; DEST likewise
(common/storage.py). The producer lists SOURCE, stores one small reference record per image
(broker/references.py: about 200 bytes, no pixels) and enqueues the same rq jobs as for stored
images; workers read and decode each image from its location, and write its mask atomically to
DEST under the same relative name (`.png`). The producer decodes nothing: a bad file is found by
the worker, which fails that image alone with the decoder's reason.

As with `--out` for stored images, this command returns when every image has an outcome: it frees
the records of finished images from Redis as they finish (their masks are already in DEST) and
lists failed ones, which stay in Redis until `producer collect --delete` reports and frees them.
`--max-pending N` bounds the images of this run held in Redis (queued, being worked on, or finished but
not yet freed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import cast

from broker.references import ImageReference
from broker.store import ImageCounts, QueueStore, new_image_id, now
from common import storage
from common.images import ImageError
from producer.enqueue import Enqueuer, EnqueueReport, PendingTimeout
from producer.pool import ProducerPool
from producer.stream import LOOK_AHEAD, PendingImages
from producer.tiling import StoredUnit

CHUNK_REFERENCES = 256  # reference records stored per round trip
FULL_LOOK_S = 2.0  # at least this often a look checks the whole LOOK_AHEAD window (images finished out of order)


class FinishedImages(PendingImages):
    """This run's images still in Redis; each look frees those that finished (their masks are already in DEST)
    and notes those that failed (they stay in Redis for `producer collect --delete`)."""

    def __init__(self, store: QueueStore, on_collected: Callable[[int], None] = lambda n: None, **options) -> None:
        # no pool and no out_dir: the workers wrote the masks, there is nothing to collect here
        super().__init__(store, cast(ProducerPool, None), None, on_collected=on_collected, **options)
        self._seen_counts: ImageCounts | None = None
        self._last_full_look = 0.0
        self._next_window = 0  # > 0: the last look found every image it checked finished; check this many now

    def look(self) -> None:
        """At most every poll_s: free the oldest pending images that finished, note the failed ones.

        A look first reads the queue's counts (one round trip of four small commands) and goes no
        further while they have not changed: no image of the queue finished since the last look.
        Then it checks only the oldest images, twice as many as finished queue-wide since the last
        look (plus 64): workers take jobs in order, so those are the ones that finished. Every
        FULL_LOOK_S it checks the whole LOOK_AHEAD window, for images that finished out of order
        (retried jobs). Redis then does a few commands per image instead of two per pending image
        per look. The check is one round trip of two commands (the done flags and failure reasons of all
        the candidates), and the finished ones are freed in one more.
        """
        if time.monotonic() - self._last_look < self.poll_s:
            return
        self._last_look = time.monotonic()
        if not self._pending:
            return
        counts, seen = self.store.counts(), self._seen_counts
        full = time.monotonic() - self._last_full_look >= FULL_LOOK_S
        if counts == seen and not full and not self._next_window:
            return
        self._seen_counts = counts
        if full or seen is None:
            self._last_full_look, window = time.monotonic(), LOOK_AHEAD
        else:
            finished_since = sum((counts.done, counts.failed, counts.collected)) - sum((seen.done, seen.failed,
                                                                                         seen.collected))
            window = min(LOOK_AHEAD, max(self._next_window, 64 + 2 * max(0, finished_since)))
        candidates = list(islice(self._pending, window))
        outcomes = self.store.outcomes(candidates)
        finished = [i for i, (done, reason) in zip(candidates, outcomes, strict=True) if done or reason is not None]
        reasons = [reason for done, reason in outcomes if done or reason is not None]
        # all of those checked had finished: more may have, behind them
        self._next_window = min(LOOK_AHEAD, 2 * len(candidates)) if len(finished) == len(candidates) else 0
        if not finished:
            return
        written = [i for i, reason in zip(finished, reasons, strict=True) if reason is None]
        self.store.forget(written, masks=False)  # their masks are in DEST, never in Redis
        for image_id, reason in zip(finished, reasons, strict=True):
            name = self._pending[image_id].name
            if reason is None:
                self.report.written.append(Path(name))
            else:
                self.report.failed[name] = reason
        self._drop(finished)


def reference_chunks(source: str, dest: str, height: int, width: int,
                     found: list[tuple[str, str]]) -> tuple[list[ImageReference], list[ImageError]]:
    """A reference per found image (location, name), with its mask's location under dest; names that cannot
    name a mask are returned as problems."""
    images, problems = [], []
    for location, name in found:
        try:
            mask_url = storage.join(dest, storage.mask_name(name))
        except ValueError as exc:
            problems.append(storage.location_error(location, str(exc)))
            continue
        images.append(ImageReference(new_image_id(), name, location, mask_url, height, width, now()))
    return images, problems


def enqueue_references(
    enqueuer: Enqueuer,
    source: str,
    dest: str,
    height: int,
    width: int,
    pending: FinishedImages,
    max_pending: int | None = None,
    pending_timeout_s: float = 3600.0,
    on_progress: Callable[[int, ImageError | None], None] = lambda files, problem: None,
    on_found: Callable[[int], None] = lambda files: None,
    stop: threading.Event | None = None,
) -> EnqueueReport:
    """Enqueue every image under `source` by reference, masks to `dest`; problems of the listing are reported.

    `on_progress(images, problem)` is called as images are enqueued (problem None) and once per
    problem (images 0). With max_pending, no chunk is stored while that many of this run's images are
    in Redis (PendingTimeout if none leaves for pending_timeout_s). Once `stop` is set, no further
    chunk is stored and the report says `interrupted`.
    """
    stop = stop or threading.Event()
    source, dest = storage.normalize(source), storage.normalize(dest)
    found, problems = storage.list_images(source)
    images, naming_problems = reference_chunks(source, dest, height, width, found)
    on_found(len(images))
    for problem in problems + naming_problems:
        enqueuer.report.rejected.append(problem)
        on_progress(0, problem)
    # a quarter of --max-pending at a time: the queue is topped up while workers still have work (storing
    # --max-pending at once waited for every image of it to finish before the next chunk: workers idled)
    chunk_size = CHUNK_REFERENCES if max_pending is None else max(1, min(CHUNK_REFERENCES, max_pending // 4))
    try:
        for start in range(0, len(images), chunk_size):
            chunk = images[start:start + chunk_size]
            pending.look()
            if max_pending is not None and len(pending) + len(chunk) > max_pending:
                enqueuer.flush()  # the images held for a short job must be queued, or nothing will leave
            if max_pending is not None and not pending.wait_below(
                    max(1, max_pending - len(chunk) + 1), time.monotonic() + pending_timeout_s) and not stop.is_set():
                raise PendingTimeout(f"{len(pending)} images still pending in Redis after {pending_timeout_s:.0f} s "
                                     f"(--max-pending {max_pending}): are workers running?")
            if stop.is_set():
                enqueuer.report.interrupted = True
                break
            enqueuer.store.store_references(chunk)
            enqueuer.add_ids([(image.image_id, image.name) for image in chunk])
            enqueuer.enqueue_full_jobs()
            pending.add([StoredUnit(image.image_id, image.name, 1, tiled=False) for image in chunk])
            on_progress(len(chunk), None)
    finally:  # images already stored get their jobs, even when the run stops early
        enqueuer.flush()
    return enqueuer.report

