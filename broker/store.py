"""The Redis key layout and job schema shared by producer and worker.

Per queue Q (all keys start with `segq:Q:`):

    img:<id>    hash  pixels (uint8 bytes, height x width at the engine's input size), height, width,
                      original_height, original_width, name (relative path), enqueued_at (unix s)
    mask:<id>   hash  mask (uint8 class ids, bytes, height x width at the engine's size), height, width
    manifest    hash  <id> -> name, every image ever enqueued on Q
    done        set   ids whose mask is written
    failed      hash  <id> -> reason, images that failed (removed again if a retry succeeds)

An rq job (JSON-serialized) calls `worker.jobs.segment_images` with one argument: the list of image
ids. Images travel by reference, never inside job arguments; writing a mask twice overwrites it, so
processing is idempotent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from broker.errors import BadJob

JOB_FUNC = "worker.jobs.segment_images"


@dataclass(frozen=True)
class QueueKeys:
    """Key names for one queue."""

    queue: str

    @property
    def prefix(self) -> str:
        return f"segq:{self.queue}:"

    def image(self, image_id: str) -> str:
        return f"{self.prefix}img:{image_id}"

    def mask(self, image_id: str) -> str:
        return f"{self.prefix}mask:{image_id}"

    @property
    def manifest(self) -> str:
        return f"{self.prefix}manifest"

    @property
    def done(self) -> str:
        return f"{self.prefix}done"

    @property
    def failed(self) -> str:
        return f"{self.prefix}failed"


@dataclass(frozen=True)
class StoredImage:
    """An image as the worker receives it: uint8 pixels (height, width) at the engine's input size."""

    image_id: str
    name: str
    pixels: np.ndarray
    original_height: int
    original_width: int
    enqueued_at: float


def new_image_id() -> str:
    """A fresh random image id (32 hex chars)."""
    return uuid.uuid4().hex


def save_image(pipe: redis.client.Pipeline, keys: QueueKeys, image: StoredImage) -> None:
    """Queue the commands that store one image and add it to the manifest."""
    height, width = image.pixels.shape
    pipe.hset(
        keys.image(image.image_id),
        mapping={
            "pixels": np.ascontiguousarray(image.pixels, dtype=np.uint8).tobytes(),
            "height": height,
            "width": width,
            "original_height": image.original_height,
            "original_width": image.original_width,
            "name": image.name,
            "enqueued_at": repr(image.enqueued_at),
        },
    )
    pipe.hset(keys.manifest, image.image_id, image.name)


def _decode_image(image_id: str, fields: dict[bytes, bytes]) -> StoredImage:
    """Rebuild a StoredImage from its hash; ValueError if the hash is incomplete or inconsistent."""
    height, width = int(fields[b"height"]), int(fields[b"width"])
    pixels = np.frombuffer(fields[b"pixels"], dtype=np.uint8)
    if pixels.size != height * width:
        raise ValueError(f"holds {pixels.size} bytes of pixels for a {height}x{width} image")
    return StoredImage(
        image_id=image_id,
        name=fields[b"name"].decode(),
        pixels=pixels.reshape(height, width),
        original_height=int(fields[b"original_height"]),
        original_width=int(fields[b"original_width"]),
        enqueued_at=float(fields[b"enqueued_at"]),
    )


def load_images(client: redis.Redis, keys: QueueKeys, image_ids: list[str]) -> list[StoredImage | str]:
    """Fetch images in one round trip; each entry is the image or a reason it could not be read."""
    pipe = client.pipeline(transaction=False)
    for image_id in image_ids:
        pipe.hgetall(keys.image(image_id))
    loaded: list[StoredImage | str] = []
    for image_id, fields in zip(image_ids, pipe.execute()):
        if not fields:
            loaded.append(f"image {image_id} is not in Redis (expired, purged or never stored)")
            continue
        try:
            loaded.append(_decode_image(image_id, fields))
        except (KeyError, ValueError) as exc:
            loaded.append(f"image {image_id} is malformed in Redis: {exc}")
    return loaded


def save_mask(pipe: redis.client.Pipeline, keys: QueueKeys, image_id: str, mask: np.ndarray) -> None:
    """Queue the commands that store one mask (uint8 (H, W)) and mark the image done."""
    height, width = mask.shape
    pipe.hset(keys.mask(image_id), mapping={"mask": mask.tobytes(), "height": height, "width": width})
    pipe.sadd(keys.done, image_id)
    pipe.hdel(keys.failed, image_id)


def save_failure(pipe: redis.client.Pipeline, keys: QueueKeys, image_id: str, reason: str) -> None:
    """Queue the commands that record why an image failed."""
    pipe.hset(keys.failed, image_id, reason)


def load_mask(client: redis.Redis, keys: QueueKeys, image_id: str) -> np.ndarray | None:
    """The stored mask (uint8 (H, W) at the engine's size), or None if none is written."""
    fields = client.hgetall(keys.mask(image_id))
    if not fields:
        return None
    height, width = int(fields[b"height"]), int(fields[b"width"])
    return np.frombuffer(fields[b"mask"], dtype=np.uint8).reshape(height, width)


def load_original_size(client: redis.Redis, keys: QueueKeys, image_id: str) -> tuple[int, int] | None:
    """(original_height, original_width) of an image, or None if its record is gone."""
    height, width = client.hmget(keys.image(image_id), ["original_height", "original_width"])
    if height is None or width is None:
        return None
    return int(height), int(width)


def job_arguments(image_ids: list[str]) -> list[Any]:
    """The positional arguments of a segmentation job (JSON-serializable)."""
    return [list(image_ids)]


def parse_job_arguments(args: Any) -> list[str]:
    """Image ids from a job's arguments; BadJob if they are not what `job_arguments` writes."""
    if (
        not isinstance(args, (list, tuple))
        or len(args) != 1
        or not isinstance(args[0], list)
        or not args[0]
        or not all(isinstance(i, str) and i for i in args[0])
    ):
        raise BadJob(f"job arguments must be [[image_id, ...]] with at least one id, got {args!r:.200}")
    return list(args[0])


def now() -> float:
    """Wall-clock time in unix seconds (what `enqueued_at` uses)."""
    return time.time()
