"""The producer's parallel hands: decode-and-store and write-masks tasks, run in worker processes.

Decoding a 512x512 PNG and compressing it takes a few milliseconds of CPU, and so does writing a
mask PNG: one process tops out at a few hundred images a second. (A PNG that already is the engine
input is stored as it is, without decoding: see `encode_file`.) `ProducerPool` runs these tasks in
`workers` processes, each with its own Redis connection (broker/process_store.py), so that only small
results (image ids, names, errors) cross between processes, never pixels. With `workers=1` the same
functions run in the calling process, with no pool (small inputs, tests, machines with one core).

A store task decodes a chunk of files, stores the good ones in one pipelined round trip and returns
their ids; the caller enqueues the jobs naming them only after that, so a worker never sees a job
whose images are not stored yet. A collect task writes the masks of a chunk of images (see
producer/collect.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from broker.connection import BrokerSettings
from broker.payloads import Payload, encode_image, encode_png
from broker.process_store import fork_store_pool, process_store
from broker.store import EncodedImage, QueueStore, new_image_id, now
from common.images import ImageError, ImageSource, decode_image, fit_decoded, read_png_as_is
from common.pages import probe_or_read
from producer.collect import CollectReport, collect_masks
from producer.tiling import TILE, Fitting, StoredUnit, is_tiled, store_tiled


@dataclass(frozen=True)
class StoredChunk:
    """What a store task did with its files: (record id, name) of each engine input stored (what jobs name:
    images and tiles), each file stored (`units`: an image, or a tiled image and its record count) and each
    file rejected."""

    stored: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[ImageError] = field(default_factory=list)
    units: list[StoredUnit] = field(default_factory=list)

    @property
    def files(self) -> int:
        """Files handled (stored or rejected)."""
        return len(self.units) + len(self.rejected)


def encode_file(path: Path, height: int, width: int) -> tuple[Payload, int, int]:
    """One file as the image payload of a height x width engine input, with the file's (height, width).

    A PNG that already is the engine input (common.images.read_png_as_is) is stored as it is, with
    neither decoding nor compression (the worker decodes it); any other file is decoded, resized
    and zstd-compressed. ImageError names the file and its problem.
    """
    as_is = read_png_as_is(path, height, width)
    if as_is is not None:
        return encode_png(as_is, height, width), height, width
    decoded = decode_image(path, height, width)
    return encode_image(decoded.pixels), decoded.original_height, decoded.original_width


def store_files(store: QueueStore, sources: Sequence[ImageSource], height: int, width: int,
                fitting: Fitting = TILE) -> StoredChunk:
    """Encode each file for a height x width engine and store the good ones: the ordinary images in one round
    trip, each tiled file (producer/tiling.py) as it is read."""
    images: list[EncodedImage] = []
    chunk = StoredChunk()
    fitting = fitting.for_engine(height, width)
    for source in sources:
        try:
            as_is = read_png_as_is(source.path, height, width)
            if as_is is not None:
                payload, original_height, original_width = encode_png(as_is, height, width), height, width
            else:  # a PNG, JPEG or BMP is decoded once here (its oriented shape needs that), a TIFF's headers read
                shape, page = probe_or_read(source.path, max_pages=fitting.max_pages)
                if is_tiled(shape, height, width, fitting):
                    records, unit = store_tiled(store, source, shape, height, width, fitting,
                                                None if page is None else [page])
                    chunk.stored.extend(records)
                    chunk.units.append(unit)
                    continue
                decoded = decode_image(source.path, height, width) if page is None else fit_decoded(page, height, width)
                payload, original_height, original_width = (encode_image(decoded.pixels), decoded.original_height,
                                                             decoded.original_width)
        except ImageError as problem:
            chunk.rejected.append(problem)
            continue
        image = EncodedImage(new_image_id(), source.name, payload, original_height, original_width, now())
        images.append(image)
        chunk.stored.append((image.image_id, image.name))  # in file order; stored below, before any job names it
        chunk.units.append(StoredUnit(image.image_id, image.name, 1, tiled=False))
    if images:
        store.store_encoded(images)
    return chunk


# --- inside a pool process -------------------------------------------------------------------

# Pool processes run at a lower CPU priority: decoding is bulk work, and a GPU worker on the same
# host must keep the CPU it needs to feed its engine (measured on an H200 host: 16 un-niced decode
# processes starved the worker's feeding threads).
POOL_NICENESS = 10


def _lower_priority() -> None:
    """Pool-process `prepare` hook: lower this process's CPU priority (before it connects to Redis).

    The pool processes ignore Ctrl-C (broker/process_store.py): it reaches the whole process group,
    and the parent handles it (finishes the chunks in flight, enqueues their jobs, says what was
    queued), so a pool process neither dies mid-chunk nor prints a KeyboardInterrupt traceback.
    """
    os.nice(POOL_NICENESS)


def _store_task(sources: list[ImageSource], height: int, width: int, fitting: Fitting) -> StoredChunk:
    return store_files(process_store(), sources, height, width, fitting)


def _collect_task(image_ids: list[str], out_dir: Path, delete: bool) -> CollectReport:
    return collect_masks(process_store(), out_dir, image_ids, delete=delete)


# --- the pool ---------------------------------------------------------------------------------


def _done(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


class ProducerPool:
    """Store and collect tasks on `workers` processes (or inline when workers == 1). Use as a context manager.

    Every submit returns a Future; an inline task has already run when submit returns.
    """

    def __init__(self, settings: BrokerSettings | None, store: QueueStore, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._store = store
        self._executor: ProcessPoolExecutor | None = None
        if workers > 1:
            if settings is None:
                raise ValueError("a pool of worker processes needs the broker settings to connect")
            # forked now (where fork exists): they start and connect while this one looks for the files
            self._executor = fork_store_pool(settings, workers, _lower_priority)

    def submit_store(self, sources: list[ImageSource], height: int, width: int,
                     fitting: Fitting = TILE) -> Future:
        """Decode and store `sources`; the Future gives a StoredChunk."""
        if self._executor is None:
            return self._inline(store_files, self._store, sources, height, width, fitting)
        return self._executor.submit(_store_task, sources, height, width, fitting)

    def submit_collect(self, image_ids: list[str], out_dir: Path, delete: bool) -> Future:
        """Write the masks of `image_ids` under out_dir (and forget them if delete).

        The Future gives a CollectReport."""
        if self._executor is None:
            return self._inline(collect_masks, self._store, out_dir, image_ids, delete=delete)
        return self._executor.submit(_collect_task, image_ids, out_dir, delete)

    @staticmethod
    def _inline(function, *args, **kwargs) -> Future:
        try:
            return _done(function(*args, **kwargs))
        except Exception as exc:  # delivered through the Future, as a pool would
            return _failed(exc)

    def close(self, cancel: bool = False) -> None:
        """Stop the worker processes (waiting for running tasks unless cancel)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None

    def __enter__(self) -> ProducerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)
