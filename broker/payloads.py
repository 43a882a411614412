"""How pixels and masks are encoded in Redis: compact, tagged with their format, checked when decoded.

- Images: zstd level 1 (codec tag `zstd1`): nearly PNG's ratio at a small fraction of its encode and
  decode time, so the worker's decoding keeps up with the engine (zstandard releases the GIL).
- Masks with class ids 0/1 (the 2-class U-Net): one bit per pixel (`np.packbits`), then zstd level 1
  (codec `packbits+zstd1`). Masks with larger class ids are stored as zstd level 1 of the uint8 ids
  (codec `zstd1`), so they still round-trip exactly.
- Images that arrive as PNG files already holding the engine input (8-bit gray at the engine's
  size, one frame, no orientation; see common.images.read_png_as_is) are stored as the file's bytes
  (codec `png`): the producer neither decodes nor compresses them, and PNG is the most compact of the
  codecs. The worker decodes them once, in its decode processes (worker/loader.py), never on the
  thread that submits batches. Before decoding, every chunk is checked against its CRC-32, so
  altered bytes raise `CorruptPayload`, as they do for zstd.

The measurements behind these choices (`benchmarks/payloads.py`) are in docs/performance.md.

Every stored payload sits in a hash next to a `format` field (`segq-image/1` or `segq-mask/1`), a
`codec` field, `height` and `width`, and its bytes under `data`. Records written by segqueue versions
before this format (raw `pixels` / `mask` fields, no `format`) raise `OldFormat`, a PayloadError that
names the image and says to enqueue it again; they are never read as garbage. zstd frames carry their
content size and a content checksum: truncated or tampered bytes raise `CorruptPayload`, naming the
image. zstandard's compressor and decompressor objects are not thread-safe, so each thread gets its own.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np
import zstandard
from PIL import Image

from broker.errors import SegqueueError
from common import png

IMAGE_FORMAT = "segq-image/1"
MASK_FORMAT = "segq-mask/1"
CODEC_ZSTD = "zstd1"  # zstd level 1 of the uint8 values, row-major
CODEC_PNG = "png"  # a whole PNG file: 8-bit gray, not interlaced, at (height, width), one frame
CODEC_PACKBITS_ZSTD = "packbits+zstd1"  # np.packbits of a 0/1 array (big bit order), then zstd level 1
ZSTD_LEVEL = 1


class PayloadError(SegqueueError):
    """A stored image or mask cannot be decoded; the message names the image and what is wrong."""


class OldFormat(PayloadError):
    """The record was written by an older segqueue version (raw bytes, no format tag)."""


class CorruptPayload(PayloadError):
    """The record's bytes are truncated, tampered with, or inconsistent with its header fields."""


@dataclass(frozen=True)
class Payload:
    """An encoded array: the hash fields that describe it, and its bytes."""

    format: str
    codec: str
    height: int
    width: int
    data: bytes

    def fields(self) -> dict[str, str | int | bytes]:
        """The hash fields this payload is stored as."""
        return {"format": self.format, "codec": self.codec, "height": self.height, "width": self.width,
                "data": self.data}


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _as_uint8_2d(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (height, width), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def encode_image(pixels: np.ndarray) -> Payload:
    """uint8 (H, W) pixels -> a zstd-1 payload."""
    pixels = _as_uint8_2d(pixels, "pixels")
    height, width = pixels.shape
    return Payload(IMAGE_FORMAT, CODEC_ZSTD, height, width, _compressor().compress(pixels.tobytes()))


def encode_png(data: bytes, height: int, width: int) -> Payload:
    """The bytes of a PNG file that holds the engine input as is (common.images.read_png_as_is) -> a png payload."""
    return Payload(IMAGE_FORMAT, CODEC_PNG, height, width, data)


def encode_mask(mask: np.ndarray) -> Payload:
    """uint8 (H, W) class ids -> packbits+zstd if every id is 0 or 1, else zstd of the ids."""
    mask = _as_uint8_2d(mask, "mask")
    height, width = mask.shape
    if mask.size and int(mask.max()) > 1:
        return Payload(MASK_FORMAT, CODEC_ZSTD, height, width, _compressor().compress(mask.tobytes()))
    packed = np.packbits(mask, axis=None)
    return Payload(MASK_FORMAT, CODEC_PACKBITS_ZSTD, height, width, _compressor().compress(packed.tobytes()))


def _unzstd(image_id: str, what: str, data: bytes, expected: int) -> bytes:
    """Decompress one zstd frame that must hold exactly `expected` bytes (checked before and after)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"{what} of image {image_id} is corrupt in Redis (not a zstd frame: {exc})") from None
    if declared != expected:
        raise CorruptPayload(f"{what} of image {image_id} is corrupt in Redis: it declares {declared} bytes, "
                             f"its header says {expected}")
    try:
        raw = _decompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"{what} of image {image_id} is corrupt in Redis (truncated or altered: {exc})") from None
    if len(raw) != expected:
        raise CorruptPayload(f"{what} of image {image_id} is corrupt in Redis: {len(raw)} bytes, expected {expected}")
    return raw


def _header(
    image_id: str, what: str, fields: dict[bytes, bytes], fmt: str, old_field: bytes
) -> tuple[str, int, int, bytes]:
    """Check the format tag and read (codec, height, width, data) from a record's hash fields."""
    tag = fields.get(b"format")
    if tag is None:
        if old_field in fields:
            raise OldFormat(f"{what} of image {image_id} was stored by an older segqueue version (raw bytes, no "
                            f"format tag) and cannot be read: enqueue the image again")
        raise CorruptPayload(f"{what} of image {image_id} is malformed in Redis: no format field")
    if tag.decode(errors="replace") != fmt:
        raise PayloadError(f"{what} of image {image_id} has format {tag.decode(errors='replace')!r}, this "
                           f"segqueue reads {fmt!r}: enqueue the image again with this version")
    try:
        codec = fields[b"codec"].decode()
        height, width = int(fields[b"height"]), int(fields[b"width"])
        data = fields[b"data"]
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptPayload(f"{what} of image {image_id} is malformed in Redis: bad or missing field {exc}") from None
    if height < 1 or width < 1:
        raise CorruptPayload(f"{what} of image {image_id} is malformed in Redis: size {height}x{width}")
    return codec, height, width, data


def decode_image(image_id: str, fields: dict[bytes, bytes]) -> np.ndarray:
    """An image record's hash fields -> uint8 (H, W) pixels; PayloadError naming the image otherwise."""
    codec, height, width, data = _header(image_id, "pixels", fields, IMAGE_FORMAT, b"pixels")
    if codec == CODEC_PNG:
        return _png_pixels(image_id, data, height, width)
    if codec != CODEC_ZSTD:
        raise PayloadError(f"pixels of image {image_id} use unknown codec {codec!r}")
    raw = _unzstd(image_id, "pixels", data, height * width)
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width)


def _png_pixels(image_id: str, data: bytes, height: int, width: int) -> np.ndarray:
    """A png payload's bytes -> uint8 (height, width); CorruptPayload unless it is that intact 8-bit gray PNG."""
    try:
        png.check_engine_input(data, height, width)
    except png.PngStructureError as exc:
        raise CorruptPayload(f"pixels of image {image_id} are corrupt in Redis (PNG: {exc})") from None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            pixels = np.asarray(image)
    except Exception as exc:  # bytes from Redis: any decoder failure is the record's
        raise CorruptPayload(f"pixels of image {image_id} are corrupt in Redis (PNG: {exc})") from None
    if pixels.shape != (height, width) or pixels.dtype != np.uint8:
        raise CorruptPayload(f"pixels of image {image_id} decode to {pixels.dtype} {pixels.shape}, "
                             f"expected uint8 ({height}, {width})")
    return pixels


def decode_mask(image_id: str, fields: dict[bytes, bytes]) -> np.ndarray:
    """A mask record's hash fields -> uint8 (H, W) class ids; PayloadError naming the image otherwise."""
    codec, height, width, data = _header(image_id, "mask", fields, MASK_FORMAT, b"mask")
    count = height * width
    if codec == CODEC_ZSTD:
        raw = _unzstd(image_id, "mask", data, count)
        return np.frombuffer(raw, dtype=np.uint8).reshape(height, width)
    if codec == CODEC_PACKBITS_ZSTD:
        raw = _unzstd(image_id, "mask", data, (count + 7) // 8)
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count)
        return bits.reshape(height, width)
    raise PayloadError(f"mask of image {image_id} uses unknown codec {codec!r}")
