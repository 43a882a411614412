"""The stored encodings of images and masks (broker/payloads.py): exact round trips, clear errors, no garbage."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from broker import payloads
from broker.payloads import (
    CorruptPayload,
    OldFormat,
    PayloadError,
    decode_image,
    decode_mask,
    encode_image,
    encode_mask,
)
from toolchain.synth import generate


def as_fields(payload: payloads.Payload, **extra) -> dict[bytes, bytes]:
    """The hash fields as Redis returns them (bytes keys and values)."""
    fields = {**payload.fields(), **extra}
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in fields.items()}


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (128, 96), (512, 512)])
def test_images_round_trip_exactly(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    payload = encode_image(pixels)
    assert payload.format == payloads.IMAGE_FORMAT and payload.codec == payloads.CODEC_ZSTD
    assert (payload.height, payload.width) == shape
    np.testing.assert_array_equal(decode_image("i", as_fields(payload)), pixels)


def test_synthetic_microscopy_images_shrink():
    (image, mask), = generate(1, size=512, seed=4)
    payload = encode_image(image)
    assert len(payload.data) < 0.85 * image.nbytes  # noisy images still compress by more than 15%
    np.testing.assert_array_equal(decode_image("i", as_fields(payload)), image)
    packed = encode_mask(mask)
    assert packed.codec == payloads.CODEC_PACKBITS_ZSTD and len(packed.data) < mask.nbytes / 30
    np.testing.assert_array_equal(decode_mask("i", as_fields(packed)), mask)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 64), (61, 67), (512, 512)])  # sizes not multiples of 8 too
def test_two_class_masks_round_trip_packed(shape):
    mask = (np.random.default_rng(1).random(shape) > 0.6).astype(np.uint8)
    payload = encode_mask(mask)
    assert payload.codec == payloads.CODEC_PACKBITS_ZSTD
    decoded = decode_mask("m", as_fields(payload))
    assert decoded.dtype == np.uint8 and decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)


def test_all_zero_mask_and_multi_class_mask_round_trip():
    zeros = np.zeros((33, 40), np.uint8)
    np.testing.assert_array_equal(decode_mask("z", as_fields(encode_mask(zeros))), zeros)
    classes = np.random.default_rng(2).integers(0, 5, (64, 48), dtype=np.uint8)  # ids 0..4
    payload = encode_mask(classes)
    assert payload.codec == payloads.CODEC_ZSTD
    np.testing.assert_array_equal(decode_mask("c", as_fields(payload)), classes)


def test_wrong_input_is_refused():
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        encode_mask(np.zeros((2, 4, 4), np.uint8))


def test_old_format_records_give_a_clear_error():
    old_image = {b"pixels": b"\0" * 64, b"height": b"8", b"width": b"8", b"name": b"a.png"}
    with pytest.raises(OldFormat, match=r"image abc.*older segqueue version.*enqueue the image again"):
        decode_image("abc", old_image)
    old_mask = {b"mask": b"\1" * 64, b"height": b"8", b"width": b"8"}
    with pytest.raises(OldFormat, match=r"mask of image abc.*older segqueue version"):
        decode_mask("abc", old_mask)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "size_field", "codec", "format"])
def test_corrupt_payloads_give_a_clear_error(damage):
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    fields = as_fields(encode_image(pixels))
    data = fields[b"data"]
    if damage == "truncate":
        fields[b"data"] = data[: len(data) // 2]
    elif damage == "flip":
        middle = len(data) // 2
        fields[b"data"] = data[:middle] + bytes([data[middle] ^ 0x5A]) + data[middle + 1:]
    elif damage == "garbage":
        fields[b"data"] = b"truncated"
    elif damage == "size_field":
        fields[b"height"] = b"32"
    elif damage == "codec":
        fields[b"codec"] = b"brotli"
    else:
        fields[b"format"] = b"segq-image/99"
    with pytest.raises(PayloadError, match="img7"):
        decode_image("img7", fields)


def test_corrupt_packed_mask_is_caught():
    mask = (np.random.default_rng(5).random((64, 64)) > 0.5).astype(np.uint8)
    fields = as_fields(encode_mask(mask))
    fields[b"data"] = fields[b"data"][:-3]
    with pytest.raises(CorruptPayload, match="mask of image m1"):
        decode_mask("m1", fields)


def test_codecs_are_safe_across_threads():
    images = [np.random.default_rng(i).integers(0, 256, (96, 96), dtype=np.uint8) for i in range(8)]
    errors = []

    def work(image):
        try:
            for _ in range(50):
                np.testing.assert_array_equal(decode_image("t", as_fields(encode_image(image))), image)
                mask = (image > 127).astype(np.uint8)
                np.testing.assert_array_equal(decode_mask("t", as_fields(encode_mask(mask))), mask)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(image,)) for image in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
