"""Masks of images enqueued by reference: written by the worker to storage (common/storage.py), not to Redis.

The writer thread (worker/writer.py) hands a batch's masks to the image loader (worker/loader.py),
whose decode processes encode them as PNG at each image's original size and write them atomically
under the producer's --out; only then is the image marked done in Redis and its job completed, so
a finished job's masks are always complete files. A mask that cannot be written fails its image
alone, with the reason. Masks cross to the processes bit-packed (a 0/1 mask of 512x512 is 32 KB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from broker.store import StoredImage
from common import storage


@dataclass(frozen=True)
class MaskFile:
    """One mask to write: its image, where it goes, its class ids (packed if all are 0/1) and the image's
    original (height, width) in pixels."""

    image_id: str
    url: str
    data: bytes
    packed: bool
    shape: tuple[int, int]
    original_size: tuple[int, int]

    @classmethod
    def of(cls, image: StoredImage, mask: np.ndarray) -> MaskFile:
        """The mask (uint8 (H, W) class ids at the engine's size) of an image enqueued by reference."""
        if image.mask_url is None:
            raise ValueError(f"image {image.image_id} was not enqueued by reference: its mask goes to Redis")
        mask = np.ascontiguousarray(mask, dtype=np.uint8)
        packed = not mask.size or int(mask.max()) <= 1
        data = np.packbits(mask, axis=None).tobytes() if packed else mask.tobytes()
        height, width = mask.shape
        return cls(image.image_id, image.mask_url, data, packed, (height, width),
                   (image.original_height, image.original_width))

    def mask(self) -> np.ndarray:
        """The class ids again, uint8 (H, W)."""
        height, width = self.shape
        raw = np.frombuffer(self.data, dtype=np.uint8)
        values = np.unpackbits(raw, count=height * width) if self.packed else raw
        return values.reshape(height, width)


def write_mask_files(files: Sequence[MaskFile]) -> list[str | None]:
    """Write each mask as a PNG at its original size, atomically; per file None (written) or why not."""
    reasons: list[str | None] = []
    for file in files:
        try:
            storage.write_atomically(file.url, storage.mask_png(file.mask(), *file.original_size))
            reasons.append(None)
        except (storage.StorageError, ValueError) as exc:
            reasons.append(f"mask not written: {exc}")
    return reasons
