"""The Redis key layout of one segmentation queue, owned by one object: `QueueStore`.

Every segqueue key of a queue and every operation on those keys lives in `QueueStore`; nothing
else in the project builds these key names or touches these keys. rq's own keys (the queue list,
its registries, job hashes) are rq's business and stay with rq's `Queue`.

Per queue Q (all keys start with `segq:Q:`):

    img:<id>    hash  format ("segq-image/1"), codec ("zstd1", or "png": the user's PNG file as it
                      is, when it already holds the engine input), height, width, data (the encoded
                      uint8 pixels at the engine's input size), original_height, original_width,
                      name (relative path), enqueued_at (unix s); or, enqueued by reference, format
                      "segq-ref/1" with the image's and its mask's locations (broker/references.py)
    mask:<id>   hash  format ("segq-mask/1"), codec ("packbits+zstd1" for 0/1 masks, "zstd1" when
                      class ids exceed 1), height, width, data (the encoded uint8 class ids)
    manifest    hash  <id> -> name, every image enqueued on Q and not yet forgotten
    done        set   ids whose mask is written (to Redis, or to storage for an image enqueued by reference)
    failed      hash  <id> -> reason, images that failed (removed again if a retry succeeds)
    totals      hash  collected -> images forgotten while done (their mask collected into a file, then
                      freed): a running total, so that `producer status` still counts them as finished;
                      failed_freed -> images forgotten while failed (by-reference records `producer collect
                      --delete` freed after listing their reason), so that status still counts them as failed
    bad_jobs    hash  <job id> -> reason, queued jobs so unreadable that rq cannot even record them as
                      failed (e.g. an id rq refuses); `producer status` counts them as failed jobs
    tiled       hash  <parent id> -> JSON (broker/tiled.py): how a tiled image or stack was cut into the
                      records `<parent id>.<index>` (img/mask/manifest/done/failed like any image), so
                      that collect can stitch their masks back

The encodings are in broker/payloads.py: a 512x512 image takes about 200 KB (noisy synthetic images)
or 150 KB (real microscopy) instead of 256 KB, and its 2-class mask about 4 KB instead of 256 KB.
Records written before the format tag existed (raw `pixels` / `mask` fields) are refused with a
message naming the image, not read as garbage.

The rq jobs that name these images (their function, arguments, meta and enqueue options) are
broker/jobs.py's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis

from broker import references
from broker.payloads import Payload, PayloadError, decode_image, decode_mask, encode_image, encode_mask
from common import storage
from common.images import ImageError


@dataclass(frozen=True)
class StoredImage:
    """An image as the worker receives it: uint8 pixels (height, width) at the engine's input size."""

    image_id: str
    name: str
    pixels: np.ndarray
    original_height: int
    original_width: int
    enqueued_at: float
    mask_url: str | None = None  # enqueued by reference: where the worker writes its mask (broker/references.py)


@dataclass(frozen=True)
class EncodedImage:
    """An image as the producer stores it: its encoded pixels (broker/payloads.py) and where it came from."""

    image_id: str
    name: str
    payload: Payload
    original_height: int
    original_width: int
    enqueued_at: float


@dataclass(frozen=True)
class StoredMask:
    """What collect needs of one image: its mask (or None, or why it cannot be read) and its original size; for an
    image enqueued by reference, where the worker writes its mask instead (`mask_url`: no mask in Redis)."""

    mask: np.ndarray | None
    original_size: tuple[int, int] | None
    error: str | None = None
    mask_url: str | None = None


@dataclass(frozen=True)
class ImageCounts:
    """Images of a queue: in the manifest, done (mask in Redis, or at its location for an image enqueued by
    reference), failed; and, since the queue began, collected (done, mask written to a file and freed from
    Redis: no longer in total nor done) and failed_freed (failed, reason listed, record freed: no longer in
    total nor failed)."""

    total: int
    done: int
    failed: int
    collected: int = 0
    failed_freed: int = 0


def new_image_id() -> str:
    """A fresh random image id (32 hex chars)."""
    return uuid.uuid4().hex


def now() -> float:
    """Wall-clock time in unix seconds (what `enqueued_at` uses)."""
    return time.time()


class QueueStore:
    """Every segqueue key of one queue, and every operation on them. Thread-safe as its redis client is."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.client = client
        self.queue = queue
        self._prefix = f"segq:{queue}:"
        self._manifest = f"{self._prefix}manifest"
        self._done = f"{self._prefix}done"
        self._failed = f"{self._prefix}failed"
        self._totals = f"{self._prefix}totals"
        self.bad_jobs_key = f"{self._prefix}bad_jobs"
        self._tiled = f"{self._prefix}tiled"

    def __repr__(self) -> str:
        return f"QueueStore(queue={self.queue!r})"

    def _image_key(self, image_id: str) -> str:
        return f"{self._prefix}img:{image_id}"

    def _mask_key(self, image_id: str) -> str:
        return f"{self._prefix}mask:{image_id}"

    def _hgetall(self, key: str) -> dict[bytes, bytes]:
        """HGETALL: clients from broker.connection do not decode replies, so fields and values are bytes."""
        return cast(dict[bytes, bytes], self.client.hgetall(key))

    def _hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        """HMGET: bytes per field, None where the field is missing."""
        return cast(list[bytes | None], self.client.hmget(key, fields))

    def _wrong_type_reason(self, image_id: str, key: str, record: str) -> str:
        """Why an image's key that got WRONGTYPE cannot be used, naming what the key holds (one TYPE)."""
        kind = cast(bytes, self.client.type(key)).decode()
        return f"image {image_id}: its key {key} holds a Redis {kind}, not {record} record (WRONGTYPE)"

    # --- producer: images in ----------------------------------------------------------------

    def store_images(self, images: Sequence[StoredImage]) -> None:
        """Store images given by their pixels (zstd-encoded here) and add them to the manifest, in one round trip."""
        self.store_encoded([
            EncodedImage(image.image_id, image.name, encode_image(np.asarray(image.pixels, dtype=np.uint8)),
                         image.original_height, image.original_width, image.enqueued_at)
            for image in images])

    def store_encoded(self, images: Sequence[EncodedImage]) -> None:
        """Store encoded images and add them to the manifest, in one round trip."""
        if not images:
            return
        pipe = self.client.pipeline(transaction=False)
        for image in images:
            pipe.hset(self._image_key(image.image_id), mapping=_hash_fields({
                **image.payload.fields(),
                "original_height": image.original_height,
                "original_width": image.original_width,
                "name": image.name,
                "enqueued_at": repr(image.enqueued_at),
            }))
        pipe.hset(self._manifest, mapping={image.image_id: image.name for image in images})  # after the images
        pipe.execute()

    def store_references(self, images: Sequence[references.ImageReference]) -> None:
        """Store images by reference (their locations, no pixels) and add them to the manifest, in one round trip."""
        if not images:
            return
        pipe = self.client.pipeline(transaction=False)
        for image in images:
            pipe.hset(self._image_key(image.image_id), mapping=_hash_fields(image.fields()))
        pipe.hset(self._manifest, mapping={image.image_id: image.name for image in images})  # after the images
        pipe.execute()

    # --- worker: images out, results in -----------------------------------------------------

    def read_references(self, pipe: redis.client.Pipeline, image_ids: Sequence[str]) -> ReferenceReads:
        """Queue on `pipe` a read of these images' records that is enough when they were enqueued by reference
        (one HMGET of the reference fields each: a few hundred bytes, never a payload); the returned function
        takes the pipeline's replies for them (in order; errors as replies) and gives the records that are
        references, by id, for `load_images(records=...)`. The worker reads them with its claims, so
        that fetching such a batch needs no round trip of its own."""
        for image_id in image_ids:
            pipe.hmget(self._image_key(image_id), list(references.REFERENCE_FIELDS))
        ids = list(image_ids)

        def records(replies: Sequence[Any]) -> dict[str, dict[bytes, bytes]]:
            found = {}
            for image_id, values in zip(ids, replies, strict=True):
                if isinstance(values, list):  # not an error reply (WRONGTYPE: load_images reads it again)
                    fields = {name.encode(): value for name, value in zip(references.REFERENCE_FIELDS, values,
                                                                          strict=True) if value is not None}
                    if references.is_reference(fields):
                        found[image_id] = fields
            return found
        return records

    def load_images(self, image_ids: Sequence[str],
                    records: Mapping[str, dict[bytes, bytes]] | None = None) -> list[StoredImage | str]:
        """Fetch and decode images in one round trip; each entry is the image or why it cannot be used.

        `records`: image records already read (`read_references`), by id; those images are not read
        again (no round trip at all if every image has one). Decoding runs here, in the caller (the
        worker's decode processes, worker/loader.py); its CPU cost per codec is in docs/performance.md.
        """
        known = records or {}
        unread = [image_id for image_id in image_ids if image_id not in known]
        pipe = self.client.pipeline(transaction=False)
        for image_id in unread:
            pipe.hgetall(self._image_key(image_id))
        read = dict(zip(unread, _execute_keeping_wrong_types(pipe) if unread else [], strict=True))
        loaded: list[StoredImage | str] = []
        for image_id in image_ids:
            fields = known[image_id] if image_id in known else read[image_id]
            if _is_wrong_type(fields):
                loaded.append(self._wrong_type_reason(image_id, self._image_key(image_id), "an image"))
            elif not fields:
                loaded.append(f"image {image_id} is not in Redis (expired, purged or never stored)")
            else:
                loaded.append(_stored_image(image_id, fields))
        return loaded

    def save_results(self, masks: Iterable[tuple[str, np.ndarray]], failures: Iterable[tuple[str, str]] = (),
                     written: Iterable[str] = (), pipe: redis.client.Pipeline | None = None) -> None:
        """Store masks (uint8 (H, W) class ids, encoded) and failure reasons, in one round trip; or, given
        `pipe`, queue the commands on it (the worker sends them with its jobs' completions).

        A stored mask marks its image done and clears an earlier failure of it; so does an id in
        `written` (an image enqueued by reference whose mask the worker wrote to storage: no mask record).
        """
        own = pipe is None
        pipe = self.client.pipeline(transaction=False) if pipe is None else pipe
        done: list[str] = list(written)
        for image_id, mask in masks:
            fields = encode_mask(np.asarray(mask, dtype=np.uint8)).fields()
            pipe.hset(self._mask_key(image_id), mapping=_hash_fields(fields))
            done.append(image_id)
        if done:  # one command each for all the masks
            pipe.sadd(self._done, *done)
            pipe.hdel(self._failed, *done)
        failed = dict(failures)
        if failed:
            pipe.hset(self._failed, mapping=_hash_fields(failed))
        if own:
            pipe.execute()

    # --- collect, wait, status --------------------------------------------------------------

    def load_mask(self, image_id: str) -> np.ndarray | None:
        """The stored mask (uint8 (H, W) at the engine's size), or None if none is written (for checks and
        tests: collect reads masks with `load_results`).

        Raises PayloadError (naming the image) if the mask cannot be decoded.
        """
        fields = self._hgetall(self._mask_key(image_id))
        return decode_mask(image_id, fields) if fields else None

    def load_results(self, image_ids: Sequence[str]) -> list[StoredMask]:
        """Each image's mask and original size, or for an image enqueued by reference its mask's location, in one
        round trip; an undecodable mask, or a key that holds another Redis type than a hash, gives `error`, not an
        exception."""
        pipe = self.client.pipeline(transaction=False)
        for image_id in image_ids:
            pipe.hgetall(self._mask_key(image_id))
            pipe.hmget(self._image_key(image_id), ["original_height", "original_width", "format", "mask_url"])
        replies = _execute_keeping_wrong_types(pipe)
        return [self._stored_mask(image_id, replies[2 * i], replies[2 * i + 1]) for i, image_id in enumerate(image_ids)]

    def _stored_mask(self, image_id: str, fields: Any, record_fields: Any) -> StoredMask:
        if _is_wrong_type(record_fields):
            return StoredMask(None, None, self._wrong_type_reason(image_id, self._image_key(image_id), "an image"))
        *size_fields, record_format, mask_url = record_fields
        if record_format == references.REFERENCE_FORMAT.encode():
            if not mask_url:
                return StoredMask(None, None, f"image {image_id} is malformed in Redis: its reference has no mask_url")
            return StoredMask(None, None, mask_url=mask_url.decode(errors="backslashreplace"))
        if _is_wrong_type(fields):
            return StoredMask(None, None, self._wrong_type_reason(image_id, self._mask_key(image_id), "a mask"))
        try:
            size = _original_size(size_fields)
        except ValueError:
            return StoredMask(None, None, f"image {image_id} is malformed in Redis: original size (height, width) "
                                          f"{size_fields!r} is not two positive integers")
        if not fields:
            return StoredMask(None, size)
        try:
            return StoredMask(decode_mask(image_id, fields), size)
        except PayloadError as exc:
            return StoredMask(None, size, str(exc))

    def manifest(self) -> dict[str, str]:
        """Every image enqueued on the queue and not forgotten: id -> relative name."""
        return {k.decode(errors="backslashreplace"): v.decode(errors="backslashreplace")
                for k, v in self._hgetall(self._manifest).items()}

    def names(self, image_ids: Sequence[str]) -> dict[str, str]:
        """id -> relative name for those of `image_ids` still in the manifest (one command)."""
        if not image_ids:
            return {}
        values = self._hmget(self._manifest, list(image_ids))
        return {i: v.decode(errors="backslashreplace") for i, v in zip(image_ids, values, strict=True) if v is not None}

    def failure_reasons(self, image_ids: Sequence[str]) -> list[str | None]:
        """For each image, why it failed, or None (one command)."""
        if not image_ids:
            return []
        values = self._hmget(self._failed, list(image_ids))
        return [None if v is None else v.decode(errors="backslashreplace") for v in values]

    def failures(self) -> dict[str, str]:
        """Failed images: id -> reason."""
        return {k.decode(): v.decode() for k, v in self._hgetall(self._failed).items()}

    def is_done(self, image_id: str) -> bool:
        """Whether the image's mask is written (for checks and tests: the product asks `resolved` or `counts`)."""
        return bool(self.client.sismember(self._done, image_id))

    def resolved(self, image_ids: Sequence[str]) -> list[bool]:
        """For each image, whether it has a mask or a failure, in one round trip (two commands)."""
        return [done or reason is not None for done, reason in self.outcomes(image_ids)]

    def outcomes(self, image_ids: Sequence[str]) -> list[tuple[bool, str | None]]:
        """For each image, (done, why it failed or None), in one round trip of two commands whatever their
        number: SMISMEMBER on the done set, HMGET on the failed hash."""
        if not image_ids:
            return []
        ids = list(image_ids)
        pipe = self.client.pipeline(transaction=False)
        pipe.smismember(self._done, ids)
        pipe.hmget(self._failed, ids)
        done, reasons = pipe.execute()
        return [(bool(flag), None if reason is None else reason.decode(errors="backslashreplace"))
                for flag, reason in zip(done, reasons, strict=True)]

    def counts(self) -> ImageCounts:
        """Manifest size, done and failed counts, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hlen(self._manifest)
        pipe.scard(self._done)
        pipe.hlen(self._failed)
        pipe.hmget(self._totals, ["collected", "failed_freed"])
        total, done, failed, (collected, failed_freed) = pipe.execute()
        return ImageCounts(total=total, done=done, failed=failed, collected=int(collected or 0),
                           failed_freed=int(failed_freed or 0))

    def record_counts(self) -> tuple[int, int]:
        """(image records, mask records) the queue holds in Redis, counted with SCAN (for tests and checks)."""
        images = sum(1 for _ in self.client.scan_iter(match=self._image_key("*"), count=1000))
        masks = sum(1 for _ in self.client.scan_iter(match=self._mask_key("*"), count=1000))
        return images, masks

    def forget(self, image_ids: Sequence[str], tiled: Sequence[str] = (), masks: bool = True) -> None:
        """Delete everything the store holds about these images (pixels, mask, manifest, done and failed entries),
        and the `tiled` records of these parent ids (their tiles are among image_ids). masks=False: the images
        have no mask record to delete (enqueued by reference: their masks went to storage).

        Those that were done are then added to the `collected` total, and those that had failed to
        `failed_freed`: each once, however many collectors forget it (only one transaction's SREM or
        HDEL removes it). A collector killed between the transaction and that count leaves those
        images out of the total.
        """
        if not image_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(*(self._image_key(i) for i in image_ids), *(self._mask_key(i) for i in image_ids if masks))
        pipe.hdel(self._manifest, *image_ids)
        pipe.srem(self._done, *image_ids)
        pipe.hdel(self._failed, *image_ids)
        if tiled:
            pipe.hdel(self._tiled, *tiled)
        _, _, was_done, was_failed, *_ = pipe.execute()
        if was_done or was_failed:
            totals = self.client.pipeline(transaction=False)
            if was_done:
                totals.hincrby(self._totals, "collected", was_done)
            if was_failed:
                totals.hincrby(self._totals, "failed_freed", was_failed)
            totals.execute()

    def still_stored(self, image_ids: Sequence[str]) -> list[bool]:
        """For each image, whether the manifest still holds it (not yet forgotten), in one command."""
        kept = self.names(image_ids)
        return [image_id in kept for image_id in image_ids]

    # --- tiled images and stacks (broker/tiled.py) -------------------------------------------

    def save_tiled(self, parent_id: str, record: str) -> None:
        """Store how a tiled image was cut (a JSON text, broker/tiled.py), under its parent id."""
        self.client.hset(self._tiled, parent_id, record)

    def load_tiled(self, parent_ids: Sequence[str]) -> list[bytes | None]:
        """The `tiled` records of these ids (one command); None for an id that is not a tiled image."""
        return self._hmget(self._tiled, list(parent_ids)) if parent_ids else []

    def tiled_records(self) -> list[tuple[str, bytes]]:
        """Every tiled image still held: (parent id, record), for `producer status` (one HGETALL)."""
        return [(k.decode(errors="backslashreplace"), v) for k, v in self._hgetall(self._tiled).items()]

    # --- jobs rq cannot record -------------------------------------------------------------

    def record_bad_job(self, job_id: str, reason: str) -> None:
        """Note a queued job that rq cannot load nor record as failed, with the reason."""
        self.client.hset(self.bad_jobs_key, job_id, reason)

    def bad_jobs(self) -> dict[str, str]:
        """Jobs recorded by `record_bad_job`: job id -> reason (for checks and tests: `producer status` needs
        only `bad_job_count`)."""
        return {k.decode(errors="backslashreplace"): v.decode(errors="backslashreplace")
                for k, v in self._hgetall(self.bad_jobs_key).items()}

    def bad_job_count(self) -> int:
        """How many jobs `record_bad_job` recorded."""
        return self.client.hlen(self.bad_jobs_key)


def _original_size(size_fields: Sequence[bytes | None]) -> tuple[int, int] | None:
    """(height, width) from the stored original_height/original_width; None if either is missing.

    Raises ValueError unless both are positive integers.
    """
    height, width = size_fields
    if height is None or width is None:
        return None
    size = int(height), int(width)
    if min(size) <= 0:
        raise ValueError(f"original size must be positive, got {size[0]}x{size[1]}")
    return size


def _stored_image(image_id: str, fields: dict[bytes, bytes]) -> StoredImage | str:
    """An image from its record's fields, or why they cannot be used."""
    if references.is_reference(fields):
        return _referenced_image(image_id, fields)
    try:
        pixels = decode_image(image_id, fields)  # first: a corrupt payload is named as such
        return StoredImage(
            image_id=image_id,
            name=fields[b"name"].decode(),
            pixels=pixels,
            original_height=int(fields[b"original_height"]),
            original_width=int(fields[b"original_width"]),
            enqueued_at=float(fields[b"enqueued_at"]),
        )
    except PayloadError as exc:
        return str(exc)
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        return f"image {image_id} is malformed in Redis: bad or missing field {exc}"


def _referenced_image(image_id: str, fields: dict[bytes, bytes]) -> StoredImage | str:
    """An image enqueued by reference, read from storage and decoded (common/storage.py), or why it cannot be."""
    try:
        reference = references.parse_reference(image_id, fields)
        decoded = storage.read_image(reference.url, reference.height, reference.width)
    except (PayloadError, ImageError, storage.StorageError) as exc:
        return str(exc)
    return StoredImage(image_id, reference.name, decoded.pixels, decoded.original_height, decoded.original_width,
                       reference.enqueued_at, mask_url=reference.mask_url)


ReferenceReads = Callable[[Sequence[Any]], dict[str, dict[bytes, bytes]]]


def _execute_keeping_wrong_types(pipe: redis.client.Pipeline) -> list[Any]:
    """Run a pipeline; a WRONGTYPE reply (its key holds another Redis type) stays in its place, any other
    error is raised. One image's key overwritten with, say, a string then fails that image alone, not the batch.
    """
    replies = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, redis.ResponseError) and not _is_wrong_type(reply):
            raise reply
    return replies


def _is_wrong_type(reply: Any) -> bool:
    """Whether a pipeline reply is Redis's WRONGTYPE error."""
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE")



def _hash_fields(fields: Mapping[str, Any]) -> Mapping[Any, Any]:
    """A str-keyed mapping as redis-py's HSET accepts it (its key type is a union, and mapping keys are invariant)."""
    return fields
