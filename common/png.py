"""PNG file structure, read without decoding pixels: the header, and every chunk checked against its CRC.

Used to store a PNG file in Redis as it is when its pixels already are the engine's input (8-bit
gray at the engine's size, one frame, no orientation): the producer then neither decodes nor
compresses it, and the worker decodes it once (see broker/payloads.py). A file is taken as it is only
when its structure is sound here: signature, IHDR first, every chunk's CRC-32 (which covers its type
and data), IEND last, nothing after it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER_BYTES = 33  # signature (8) + IHDR chunk (4 length + 4 type + 13 data + 4 CRC)
COLOR_GRAY = 0
# Chunks that make Pillow's pixels differ from the stored samples: EXIF orientation, animation (APNG).
CHUNKS_CHANGING_PIXELS = frozenset({b"eXIf", b"acTL"})
_CHUNK = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")


class PngStructureError(ValueError):
    """The bytes are not a well-formed PNG; the message says where."""


@dataclass(frozen=True)
class PngHeader:
    """A PNG's IHDR fields: size in pixels, bits per sample, colour type (0 = gray), interlace (0 = none)."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int

    @property
    def is_plain_gray8(self) -> bool:
        """8-bit grayscale without interlacing: the pixels are the bytes Pillow's mode "L" gives."""
        return self.bit_depth == 8 and self.color_type == COLOR_GRAY and self.interlace == 0


def read_header(head: bytes) -> PngHeader | None:
    """The IHDR of a PNG from its first HEADER_BYTES bytes; None if they do not start a PNG with its IHDR."""
    if len(head) < HEADER_BYTES or not head.startswith(SIGNATURE):
        return None
    length, kind = _CHUNK.unpack_from(head, 8)
    if length != 13 or kind != b"IHDR":
        return None
    width, height, bit_depth, color_type, _compression, _filter, interlace = _IHDR.unpack_from(head, 16)
    return PngHeader(width, height, bit_depth, color_type, interlace)


def chunk_types(data: bytes) -> list[bytes]:
    """The type of every chunk of a whole PNG file, in order, after checking each chunk's CRC.

    Raises PngStructureError for a missing signature, a truncated chunk, a CRC mismatch, a first
    chunk other than IHDR, no IEND, or bytes after IEND.
    """
    if not data.startswith(SIGNATURE):
        raise PngStructureError("no PNG signature")
    view = memoryview(data)
    types: list[bytes] = []
    offset = len(SIGNATURE)
    while offset < len(data):
        if offset + 12 > len(data):
            raise PngStructureError(f"truncated chunk header at byte {offset}")
        length, kind = _CHUNK.unpack_from(data, offset)
        end = offset + 8 + length
        if end + 4 > len(data):
            raise PngStructureError(f"chunk {kind!r} at byte {offset} is truncated")
        (expected,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[offset + 4:end]) != expected:
            raise PngStructureError(f"chunk {kind!r} at byte {offset} fails its CRC check")
        types.append(kind)
        offset = end + 4
        if kind == b"IEND":
            break
    if not types or types[0] != b"IHDR":
        raise PngStructureError("first chunk is not IHDR")
    if types[-1] != b"IEND":
        raise PngStructureError("no IEND chunk (truncated file)")
    if offset != len(data):
        raise PngStructureError(f"{len(data) - offset} bytes after IEND")
    return types


def check_header(head: bytes, height: int, width: int) -> None:
    """PngStructureError unless the first HEADER_BYTES bytes start an 8-bit gray, non-interlaced height x width PNG."""
    header = read_header(head[:HEADER_BYTES])
    if header is None or not header.is_plain_gray8:
        raise PngStructureError("not an 8-bit gray, non-interlaced PNG")
    if (header.height, header.width) != (height, width):
        raise PngStructureError(f"{header.width}x{header.height} pixels, expected {width}x{height}")


def check_engine_input(data: bytes, height: int, width: int) -> None:
    """PngStructureError unless `data` is an intact PNG whose samples are uint8 (height, width) pixels as they are.

    That is: every chunk sound (chunk_types), 8-bit gray, not interlaced, exactly height x width
    (check_header), and no chunk in CHUNKS_CHANGING_PIXELS.
    """
    types = chunk_types(data)
    check_header(data, height, width)
    changing = CHUNKS_CHANGING_PIXELS.intersection(types)
    if changing:
        raise PngStructureError(f"carries {b', '.join(sorted(changing)).decode()} (orientation or animation)")
