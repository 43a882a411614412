"""PNG files that already are the engine input are stored as they are (common/png.py, codec `png`).

Checked with real PNG files written by Pillow: which files qualify, that the worker's decoding of the
stored bytes gives exactly the pixels the producer's full decoder gives, and that damaged or
inconsistent records fail with a clear error instead of giving garbage.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broker import payloads
from broker.payloads import CorruptPayload, decode_image
from common import png
from common.images import ImageError, read_png_as_is
from common.images import decode_image as decode_file
from producer.pool import encode_file
from tests.unit.test_payloads import as_fields
from toolchain.synth import generate

SIZE = 64


def microscopy(size: int = SIZE, seed: int = 0) -> np.ndarray:
    (image, _mask), = generate(1, size=size, seed=seed)
    return image


def save_png(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, format="PNG", **options)
    return path


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def insert_chunk_after_ihdr(data: bytes, extra: bytes) -> bytes:
    return data[:png.HEADER_BYTES] + extra + data[png.HEADER_BYTES:]


def test_a_gray8_png_at_the_engine_size_is_stored_as_is_and_decodes_to_the_same_pixels(tmp_path):
    pixels = microscopy()
    path = save_png(tmp_path / "a.png", Image.fromarray(pixels))
    data = read_png_as_is(path, SIZE, SIZE)
    assert data == path.read_bytes()
    payload, height, width = encode_file(path, SIZE, SIZE)
    assert payload.codec == payloads.CODEC_PNG and payload.data == data and (height, width) == (SIZE, SIZE)
    decoded = decode_image("a", as_fields(payload))
    np.testing.assert_array_equal(decoded, pixels)
    np.testing.assert_array_equal(decoded, decode_file(path, SIZE, SIZE).pixels)  # what the full decoder gives


def _other_size(tmp_path):
    return save_png(tmp_path / "big.png", Image.fromarray(microscopy(SIZE * 2)))


def _rgb(tmp_path):
    return save_png(tmp_path / "rgb.png", Image.fromarray(np.stack([microscopy()] * 3, axis=-1)))


def _gray16(tmp_path):
    return save_png(tmp_path / "g16.png", Image.fromarray(microscopy().astype(np.uint16) * 257))


def _interlaced(tmp_path):
    # Pillow cannot write Adam7; flip the IHDR interlace byte and fix its CRC: the header is what counts
    data = bytearray(save_png(tmp_path / "i.png", Image.fromarray(microscopy())).read_bytes())
    data[28] = 1
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "i.png").write_bytes(bytes(data))
    return tmp_path / "i.png"


def _with_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    return save_png(tmp_path / "exif.png", Image.fromarray(microscopy()), exif=exif)


def _animated(tmp_path):
    frames = [Image.fromarray(microscopy(seed=s)) for s in (0, 1)]
    return save_png(tmp_path / "anim.png", frames[0], save_all=True, append_images=frames[1:])


def _bad_crc(tmp_path):
    data = bytearray(save_png(tmp_path / "crc.png", Image.fromarray(microscopy())).read_bytes())
    data[60] ^= 0x01  # inside the first IDAT
    (tmp_path / "crc.png").write_bytes(bytes(data))
    return tmp_path / "crc.png"


def _truncated(tmp_path):
    data = save_png(tmp_path / "cut.png", Image.fromarray(microscopy())).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-20])
    return tmp_path / "cut.png"


@pytest.mark.parametrize("make", [_other_size, _rgb, _gray16, _interlaced, _with_exif_orientation, _animated,
                                  _bad_crc, _truncated])
def test_other_pngs_are_decoded_by_the_producer_instead(tmp_path, make):
    path = make(tmp_path)
    assert read_png_as_is(path, SIZE, SIZE) is None


def test_files_that_do_not_qualify_keep_their_decoding_and_their_errors(tmp_path):
    resized, height, width = encode_file(_other_size(tmp_path), SIZE, SIZE)
    assert resized.codec == payloads.CODEC_ZSTD and (height, width) == (SIZE * 2, SIZE * 2)
    rotated, height, width = encode_file(_with_exif_orientation(tmp_path), SIZE, SIZE)
    assert rotated.codec == payloads.CODEC_ZSTD
    np.testing.assert_array_equal(decode_image("r", as_fields(rotated)), np.rot90(microscopy(), -1))
    halved = tmp_path / "half.png"
    halved.write_bytes(_truncated(tmp_path).read_bytes()[:2000])
    with pytest.raises(ImageError) as problem:
        encode_file(halved, SIZE, SIZE)
    assert "half.png" in str(problem.value) and "truncated" in str(problem.value)


def _payload() -> payloads.Payload:
    buffer = io.BytesIO()
    Image.fromarray(microscopy()).save(buffer, format="PNG")
    return payloads.encode_png(buffer.getvalue(), SIZE, SIZE)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:60] + bytes([d[60] ^ 0x10]) + d[61:], "CRC"),  # one bit flipped in the pixel data
    (lambda d: d[:-30], "truncated"),
    (lambda d: d + b"junk", "after IEND"),
    (lambda d: b"GIF89a" + d[6:], "signature"),
    (lambda d: insert_chunk_after_ihdr(d, chunk(b"acTL", struct.pack(">II", 2, 0))), "animation"),
])
def test_damaged_png_records_fail_with_a_clear_error(damage, message):
    payload = _payload()
    fields = as_fields(payload)
    fields[b"data"] = damage(payload.data)
    with pytest.raises(CorruptPayload, match=message) as problem:
        decode_image("img42", fields)
    assert "img42" in str(problem.value)


def test_a_png_record_whose_header_disagrees_with_its_fields_is_refused():
    fields = as_fields(_payload())
    fields[b"height"] = str(SIZE * 2).encode()
    with pytest.raises(CorruptPayload, match="expected"):
        decode_image("img7", fields)
