"""The record of an image enqueued by reference (`producer enqueue --by-reference`): where it is, not its pixels.

In this mode `segq:Q:img:<id>` holds no payload, only (about 200 bytes):

    format      "segq-ref/1"
    url         where the image is: a path every worker sees, or an fsspec URL (common/storage.py)
    mask_url    where its mask goes (the same relative name under --out, `.png`)
    height, width   the engine input size the producer was given (--size)
    name        relative name, as in the manifest
    enqueued_at unix seconds

The worker reads and decodes the image from `url` (in its decode processes, as it decodes payloads)
and writes the mask to `mask_url` itself, atomically; the image is then marked done in Redis with no
mask record. No image or mask bytes pass through Redis. The rq jobs are the same as for stored
images (broker/jobs.py): lists of image ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.payloads import CorruptPayload

REFERENCE_FORMAT = "segq-ref/1"
REFERENCE_FIELDS = ("format", "url", "mask_url", "height", "width", "name", "enqueued_at")  # a record's fields


@dataclass(frozen=True)
class ImageReference:
    """One image to enqueue by reference: its id, relative name, locations, and the engine input size (pixels)."""

    image_id: str
    name: str
    url: str
    mask_url: str
    height: int
    width: int
    enqueued_at: float

    def fields(self) -> dict[str, str | int]:
        """The hash fields of its record (REFERENCE_FIELDS)."""
        return {"format": REFERENCE_FORMAT, "url": self.url, "mask_url": self.mask_url, "height": self.height,
                "width": self.width, "name": self.name, "enqueued_at": repr(self.enqueued_at)}


def is_reference(fields: dict[bytes, bytes]) -> bool:
    """Whether an image record's hash fields are a reference (not a stored payload)."""
    return fields.get(b"format") == REFERENCE_FORMAT.encode()


def parse_reference(image_id: str, fields: dict[bytes, bytes]) -> ImageReference:
    """A reference record's fields -> ImageReference; CorruptPayload naming the image if a field is bad."""
    try:
        reference = ImageReference(
            image_id=image_id,
            name=fields[b"name"].decode(),
            url=fields[b"url"].decode(),
            mask_url=fields[b"mask_url"].decode(),
            height=int(fields[b"height"]),
            width=int(fields[b"width"]),
            enqueued_at=float(fields[b"enqueued_at"]),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptPayload(f"image {image_id} is malformed in Redis: bad or missing reference field {exc}") from None
    if reference.height < 1 or reference.width < 1 or not reference.url or not reference.mask_url:
        raise CorruptPayload(f"image {image_id} is malformed in Redis: reference {fields!r:.200}")
    return reference
