"""Collect stage: masks back from Redis as PNG files at each image's original size, under its relative name.

A mask of class ids c (0..classes-1) is written as 8-bit gray c * 255 // (classes - 1): for the
2-class U-Net, background 0 and foreground 255. `a/b/cell.tif` becomes `OUT/a/b/cell.png`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from broker.store import QueueKeys, load_mask, load_original_size
from producer.images import resize_mask

NUM_CLASSES = 2


@dataclass
class CollectReport:
    """What a collect run wrote, what failed (name -> reason) and what has no mask yet (names)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def mask_path(out_dir: Path, name: str) -> Path:
    """Where the mask of the image named `name` (a relative POSIX path) is written."""
    relative = Path(*Path(name).parts).with_suffix(".png")
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"refusing to write outside {out_dir}: {name}")
    return out_dir / relative


def mask_to_png_values(mask: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """Class ids (uint8 (H, W)) -> visible gray levels: c * 255 // (classes - 1)."""
    return (mask.astype(np.uint16) * (255 // max(1, classes - 1))).astype(np.uint8)


def manifest(client: redis.Redis, keys: QueueKeys) -> dict[str, str]:
    """Every image ever enqueued on the queue: id -> relative name."""
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.manifest).items()}


def forget_image(client: redis.Redis, keys: QueueKeys, image_id: str) -> None:
    """Delete everything Redis holds about one image (pixels, mask, manifest and done entries)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.image(image_id), keys.mask(image_id))
    pipe.hdel(keys.manifest, image_id)
    pipe.srem(keys.done, image_id)
    pipe.execute()


def collect_masks(
    client: redis.Redis,
    keys: QueueKeys,
    out_dir: Path,
    image_ids: list[str] | None = None,
    on_progress: Callable[[], None] = lambda: None,
    delete: bool = False,
) -> CollectReport:
    """Write a PNG for every image (or every one of `image_ids`) that has a mask; report the rest.

    delete: once a mask file is written, delete the image and its mask from Redis (failed and
    unfinished images stay), so that a long-running queue does not grow without bound.
    """
    names = manifest(client, keys)
    wanted = list(names) if image_ids is None else image_ids
    failures = {k.decode(): v.decode() for k, v in client.hgetall(keys.failed).items()}
    report = CollectReport()
    for image_id in wanted:
        name = names.get(image_id, image_id)
        mask = load_mask(client, keys, image_id)
        size = load_original_size(client, keys, image_id)
        if mask is not None and size is not None:
            path = mask_path(out_dir, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask_to_png_values(resize_mask(mask, *size))).save(path)
            report.written.append(path)
            if delete:
                forget_image(client, keys, image_id)
        elif image_id in failures:
            report.failed[name] = failures[image_id]
        else:
            report.pending.append(name)
        on_progress()
    return report
