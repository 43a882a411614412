"""common.images: finding, validating and decoding user images (real files in tmp_path)."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from common.images import (
    SUPPORTED_SUFFIXES,
    DecodedImage,
    ImageError,
    ImageSource,
    decode_image,
    find_images,
    resize_mask,
)

RNG = np.random.default_rng(1234)


def luma(r: int, g: int, b: int) -> int:
    """Reference ITU-R 601 luma, rounded."""
    return int(np.floor(0.299 * r + 0.587 * g + 0.114 * b + 0.5))


def native(path: Path) -> np.ndarray:
    """Decode at the image's own size (no resize)."""
    with Image.open(path) as image:
        width, height = image.size
    return decode_image(path, height, width).pixels


def assert_error(excinfo: pytest.ExceptionInfo[ImageError], path: Path, *words: str) -> None:
    error = excinfo.value
    assert error.path == path
    assert path.name in str(error)
    assert str(error) == f"{path}: {error.problem}"
    for word in words:
        assert word in error.problem, error.problem


def write_tiff(path: Path, data: np.ndarray, **kwargs: object) -> Path:
    tifffile.imwrite(path, data, **kwargs)
    return path


# ---------------------------------------------------------------- PNG


def test_png_8bit_gray_is_exact(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (13, 17), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "g.png")
    decoded = decode_image(tmp_path / "g.png", 13, 17)
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, data)
    assert (decoded.original_height, decoded.original_width) == (13, 17)


def test_png_16bit_gray_divides_by_257(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 257, 385, 386, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert (tmp_path / "g16.png").read_bytes()[24] == 16  # IHDR bit depth: really 16-bit
    np.testing.assert_array_equal(native(tmp_path / "g16.png"), [[0, 0, 1, 1, 1, 2, 128, 255]])


@pytest.mark.parametrize(
    ("color", "expected"),
    [((255, 0, 0), 76), ((0, 255, 0), 150), ((0, 0, 255), 29), ((100, 150, 200), 141)],
)
def test_png_rgb_uses_601_luma(tmp_path: Path, color: tuple[int, int, int], expected: int) -> None:
    assert luma(*color) == expected
    Image.new("RGB", (4, 3), color).save(tmp_path / "c.png")
    assert (native(tmp_path / "c.png") == expected).all()


def test_png_rgba_ignores_alpha(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 3), (100, 150, 200, 255))
    image.putpixel((0, 0), (100, 150, 200, 0))  # fully transparent: same gray
    image.save(tmp_path / "a.png")
    assert (native(tmp_path / "a.png") == 141).all()


def test_png_gray_alpha_keeps_gray(tmp_path: Path) -> None:
    Image.new("LA", (3, 2), (77, 0)).save(tmp_path / "la.png")
    assert (native(tmp_path / "la.png") == 77).all()


def test_palette_png_is_expanded_then_luma(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 100, 150, 200] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as reopened:
        assert reopened.mode == "P"
    np.testing.assert_array_equal(native(tmp_path / "p.png"), [[76, 141]])


def test_one_bit_png_is_0_or_255(tmp_path: Path) -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "b.png")
    np.testing.assert_array_equal(native(tmp_path / "b.png"), [[0, 255]])


def test_animated_png_rejected(tmp_path: Path) -> None:
    path = tmp_path / "anim.png"
    frames = [Image.new("L", (4, 4), v) for v in (0, 255)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 4, 4)
    assert_error(excinfo, path, "animated PNG with 2 frames")


# ---------------------------------------------------------------- JPEG / BMP


def test_jpeg_gray_and_rgb_are_close(tmp_path: Path) -> None:
    Image.new("L", (16, 16), 100).save(tmp_path / "g.jpg", quality=95)
    Image.new("RGB", (16, 16), (100, 150, 200)).save(tmp_path / "c.JPEG", quality=95)
    assert np.abs(native(tmp_path / "g.jpg").astype(int) - 100).max() <= 2
    assert np.abs(native(tmp_path / "c.JPEG").astype(int) - 141).max() <= 3


def test_jpeg_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((16, 32), np.uint8)  # 32 wide, 16 high; bright left half
    stored[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    decoded = decode_image(tmp_path / "r.jpg", 32, 16)
    assert (decoded.original_height, decoded.original_width) == (32, 16)
    assert decoded.pixels[:14].mean() > 240  # left half of the stored image is now on top
    assert decoded.pixels[18:].mean() < 15


def test_bmp_rgb(tmp_path: Path) -> None:
    Image.new("RGB", (5, 4), (100, 150, 200)).save(tmp_path / "c.bmp")
    assert (native(tmp_path / "c.bmp") == 141).all()


def test_content_not_suffix_decides_format(tmp_path: Path) -> None:
    Image.new("L", (3, 3), 9).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert (native(tmp_path / "really_a_png.jpg") == 9).all()


# ---------------------------------------------------------------- TIFF


def decode_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        height, width = tif.pages[0].imagelength, tif.pages[0].imagewidth
    return decode_image(path, height, width).pixels


def test_tiff_uint8(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    np.testing.assert_array_equal(decode_tiff(write_tiff(tmp_path / "u8.tif", data)), data)


def test_tiff_uint16_divides_by_257(tmp_path: Path) -> None:
    data = np.array([[0, 128, 129, 385, 386, 32896, 65535]], dtype=np.uint16)
    path = write_tiff(tmp_path / "u16.TIFF", data)
    np.testing.assert_array_equal(decode_tiff(path), [[0, 0, 1, 1, 2, 128, 255]])


def test_tiff_float_in_unit_range_times_255(tmp_path: Path) -> None:
    data = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    path = write_tiff(tmp_path / "f.tif", data)
    np.testing.assert_array_equal(decode_tiff(path), [[0, 64, 128, 255]])  # 63.75, 127.5 round up


def test_tiff_float_out_of_range_is_min_max_normalised(tmp_path: Path) -> None:
    data = np.array([[-1.0, 0.0, 1.0, 3.0]], dtype=np.float64)
    path = write_tiff(tmp_path / "f64.tif", data)
    np.testing.assert_array_equal(decode_tiff(path), [[0, 64, 128, 255]])


def test_tiff_rgb_contig_and_planar_match_pillow_luma(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ref.png")
    contig = write_tiff(tmp_path / "c.tif", rgb, photometric="rgb")
    planar = write_tiff(
        tmp_path / "p.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate"
    )
    reference = native(tmp_path / "ref.png")  # Pillow's own convert("L")
    np.testing.assert_array_equal(decode_tiff(contig), reference)
    np.testing.assert_array_equal(decode_tiff(planar), reference)
    expected = [[luma(*px) for px in row] for row in rgb.tolist()]
    assert np.abs(reference.astype(int) - np.array(expected)).max() <= 1


def test_tiff_gray_alpha_keeps_first_channel(tmp_path: Path) -> None:
    data = np.dstack([np.full((4, 5), 90, np.uint8), np.zeros((4, 5), np.uint8)])
    path = write_tiff(tmp_path / "ga.tif", data, photometric="minisblack", extrasamples=["unassalpha"])
    assert (decode_tiff(path) == 90).all()


def test_tiff_bool_and_miniswhite(tmp_path: Path) -> None:
    bits = write_tiff(tmp_path / "b.tif", np.array([[True, False]]), photometric="minisblack")
    np.testing.assert_array_equal(decode_tiff(bits), [[255, 0]])
    # tifffile's default for bool is MINISWHITE (1 = black), as Pillow shows it too
    fax = write_tiff(tmp_path / "fax.tif", np.array([[True, False]]))
    with Image.open(fax) as image:
        np.testing.assert_array_equal(decode_tiff(fax), np.asarray(image.convert("L")))
    np.testing.assert_array_equal(decode_tiff(fax), [[0, 255]])
    inverted = write_tiff(tmp_path / "w.tif", np.array([[0, 255]], np.uint8), photometric="miniswhite")
    np.testing.assert_array_equal(decode_tiff(inverted), [[255, 0]])


def test_tiff_int32_scaled_by_dtype_max(tmp_path: Path) -> None:
    data = np.array([[0, 2**31 - 1]], dtype=np.int32)
    np.testing.assert_array_equal(decode_tiff(write_tiff(tmp_path / "i32.tif", data)), [[0, 255]])


def test_tiff_multi_page_rejected(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "stack.tif", np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "multi-page TIFF with 3 pages", "split")


def test_tiff_volume_rejected(tmp_path: Path) -> None:
    path = write_tiff(
        tmp_path / "vol.tif", np.zeros((4, 16, 16), np.uint8),
        photometric="minisblack", volumetric=True, tile=(16, 16),
    )
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "too many dimensions", "(4, 16, 16)")


@pytest.mark.parametrize(
    ("bad", "words"),
    [(np.nan, "NaN"), (np.inf, "infinite")],
)
def test_tiff_non_finite_float_rejected(tmp_path: Path, bad: float, words: str) -> None:
    path = write_tiff(tmp_path / "nan.tif", np.array([[0.5, bad]], np.float32))
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 1, 2)
    assert_error(excinfo, path, words, "float32")


def test_tiff_negative_signed_rejected(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "ct.tif", np.array([[-1024, 3000]], np.int16))
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 1, 2)
    assert_error(excinfo, path, "negative values", "int16")


def test_tiff_unsupported_pixel_type_rejected(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "cx.tif", np.zeros((2, 2), np.complex64))
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 2, 2)
    assert_error(excinfo, path, "unsupported pixel type complex64")


def test_tiff_zero_size_rejected(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns that this TIFF is nonconformant
        path = write_tiff(tmp_path / "empty.tif", np.zeros((0, 4), np.uint8))
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 2, 2)
    assert_error(excinfo, path, "zero-size image")


def test_tiff_truncated_rejected(tmp_path: Path) -> None:
    full = write_tiff(tmp_path / "full.tif", np.zeros((64, 64), np.uint16)).read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "TIFF")
    assert "corrupt" in excinfo.value.problem or "truncated" in excinfo.value.problem


# ---------------------------------------------------------------- resizing


def test_resize_keeps_original_size_and_identity_is_exact(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "x.png")
    resized = decode_image(tmp_path / "x.png", 16, 24)
    assert resized.pixels.shape == (16, 24)
    assert resized.pixels.dtype == np.uint8 and resized.pixels.flags.c_contiguous
    assert (resized.original_height, resized.original_width) == (30, 40)
    expected = np.asarray(Image.fromarray(data).resize((24, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resized.pixels, expected)
    same = decode_image(tmp_path / "x.png", 30, 40)
    np.testing.assert_array_equal(same.pixels, data)


def test_resize_mask_is_nearest(tmp_path: Path) -> None:
    mask = RNG.choice(np.array([0, 3, 200], np.uint8), size=(16, 24))
    back = resize_mask(mask, 30, 41)
    assert back.shape == (30, 41) and back.dtype == np.uint8 and back.flags.c_contiguous
    assert set(np.unique(back)) <= {0, 3, 200}
    np.testing.assert_array_equal(resize_mask(mask, 16, 24), mask)
    with pytest.raises(ValueError):
        resize_mask(mask.astype(np.float32), 4, 4)


def test_too_many_pixels_rejected_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8, max_pixels=5000)
    assert_error(excinfo, path, "too large", "100x100", "5000")


def test_decoded_image_validates_pixels() -> None:
    with pytest.raises(ValueError):
        DecodedImage(np.zeros((2, 2), np.float32), 2, 2)


# ---------------------------------------------------------------- decode errors


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "empty file")


def test_truncated_png(tmp_path: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "truncated PNG")


def test_png_with_broken_header(tmp_path: Path) -> None:
    path = tmp_path / "head.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "corrupt PNG")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, not an image\n")
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "not a PNG, JPEG, BMP or TIFF image")


def test_other_image_format_refused(tmp_path: Path) -> None:
    path = tmp_path / "pic.png"
    Image.new("L", (4, 4)).save(path, format="GIF")
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "not a PNG, JPEG, BMP or TIFF image")


def test_decode_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.png"
    with pytest.raises(ImageError) as excinfo:
        decode_image(path, 8, 8)
    assert_error(excinfo, path, "cannot read file")


def test_image_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(ImageError(Path("a/b.png"), "empty file (0 bytes)")))
    assert (error.path, error.problem, str(error)) == (
        Path("a/b.png"), "empty file (0 bytes)", "a/b.png: empty file (0 bytes)"
    )


# ---------------------------------------------------------------- find_images


def touch_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (2, 2)).save(path, format="PNG")
    return path


UNSUPPORTED_TXT = "unsupported file type '.txt' (supported: .bmp, .jpeg, .jpg, .png, .tif, .tiff)"


def test_find_images_expands_directories(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for rel in ["b.png", "a/z.TIF", "a/sub/c.jpeg", "a.BMP", ".hidden.png", ".cache/x.png", "notes.txt"]:
        touch_png(root / rel)
    single = touch_png(tmp_path / "other" / "single.JPG")
    sources, errors = find_images([root, single])
    assert [(e.path, e.problem) for e in errors] == [(root / "notes.txt", UNSUPPORTED_TXT)]
    assert [s.name for s in sources] == ["a.BMP", "a/sub/c.jpeg", "a/z.TIF", "b.png", "single.JPG"]
    assert sources[1] == ImageSource(root / "a" / "sub" / "c.jpeg", "a/sub/c.jpeg")
    assert sources[-1] == ImageSource(single, "single.JPG")
    assert all(s.path.is_file() for s in sources)
    again, errors_again = find_images([root, single])  # deterministic
    assert (again, [str(e) for e in errors_again]) == (sources, [str(e) for e in errors])


def test_supported_suffixes() -> None:
    assert SUPPORTED_SUFFIXES == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def test_find_images_missing_path(tmp_path: Path) -> None:
    ok = touch_png(tmp_path / "ok.png")
    missing = tmp_path / "missing.png"
    sources, errors = find_images([missing, ok])
    assert [s.name for s in sources] == ["ok.png"]
    assert len(errors) == 1 and errors[0].path == missing
    assert "missing.png" in str(errors[0]) and "no such file or directory" in errors[0].problem


def test_find_images_explicit_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "movie.gif"
    path.write_bytes(b"GIF89a")
    sources, errors = find_images([path])
    assert sources == []
    assert len(errors) == 1 and "movie.gif" in str(errors[0])
    assert "unsupported file type '.gif'" in errors[0].problem and ".png" in errors[0].problem


def test_find_images_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    sources, errors = find_images([tmp_path / "empty"])
    assert sources == []
    assert [(e.path, e.problem) for e in errors] == [
        (tmp_path / "empty" / "readme.txt", UNSUPPORTED_TXT),
        (tmp_path / "empty", "no supported images in directory (looked for .bmp, .jpeg, .jpg, .png, .tif, .tiff)"),
    ]


def test_find_images_duplicate_names(tmp_path: Path) -> None:
    first = touch_png(tmp_path / "one" / "x.png")
    second = touch_png(tmp_path / "two" / "x.png")
    sources, errors = find_images([tmp_path / "one", second])
    assert sources == [ImageSource(first, "x.png")]
    assert len(errors) == 1 and errors[0].path == second
    assert str(second) in str(errors[0])
    assert "duplicate name 'x.png'" in errors[0].problem and str(first) in errors[0].problem


def test_tiff_palette_goes_through_16bit_colormap(tmp_path: Path) -> None:
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1] = [100 * 257, 150 * 257, 200 * 257]
    colormap[:, 2] = [65535, 0, 0]
    data = np.array([[0, 1, 2]], np.uint8)
    path = write_tiff(tmp_path / "pal.tif", data, photometric="palette", colormap=colormap)
    np.testing.assert_array_equal(decode_tiff(path), [[0, 141, 76]])


def test_lzw_compressed_tiff_decodes(tmp_path: Path) -> None:
    """LZW TIFFs (common from microscopes) decode: imagecodecs is a dependency for this."""
    path = tmp_path / "lzw.tif"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path, compression="tiff_lzw")
    np.testing.assert_array_equal(decode_image(path, 8, 8).pixels, np.arange(64, dtype=np.uint8).reshape(8, 8))


# ---------------------------------------------------------------- names that are not UTF-8


def raw_named_png(folder: Path, raw_name: bytes) -> Path:
    """Write a real PNG whose file name is the bytes `raw_name` (created through a bytes path)."""
    Image.new("L", (2, 2)).save(folder / "tmp.png")
    data = (folder / "tmp.png").read_bytes()
    (folder / "tmp.png").unlink()
    fd = os.open(os.path.join(os.fsencode(folder), raw_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return folder / os.fsdecode(raw_name)


def test_find_images_rejects_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    good = touch_png(tmp_path / "good.png")
    bad = raw_named_png(tmp_path, b"caf\xe9.png")
    sources, errors = find_images([tmp_path])
    assert sources == [ImageSource(good, "good.png")]
    assert len(errors) == 1
    assert errors[0].path == bad and bad.exists()  # the real name, to open or rename the file
    assert errors[0].problem == "file name is not valid UTF-8; rename it"
    message = str(errors[0])
    assert message == f"{tmp_path}/caf\\xe9.png: file name is not valid UTF-8; rename it"
    assert message.encode("utf-8").decode("utf-8") == message  # printable, storable
    assert str(pickle.loads(pickle.dumps(errors[0]))) == message  # crosses to pool processes

    direct_sources, direct_errors = find_images([bad, good])
    assert direct_sources == [ImageSource(good, "good.png")]
    assert [str(e) for e in direct_errors] == [message]


def test_find_images_rejects_directory_name_that_is_not_utf8(tmp_path: Path) -> None:
    good = touch_png(tmp_path / "good.png")
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"d\xff"))
    bad_dir = tmp_path / os.fsdecode(b"d\xff")
    touch_png(bad_dir / "inside.png")
    sources, errors = find_images([tmp_path])
    assert sources == [ImageSource(good, "good.png")]
    assert [str(e) for e in errors] == [f"{tmp_path}/d\\xff: directory name is not valid UTF-8; rename it"]


def test_image_error_message_escapes_any_lone_surrogate() -> None:
    error = ImageError(Path("a\udce9b\ud800.png"), "bad \udcff")
    assert str(error) == "a\\xe9b\\ud800.png: bad \\xff"
    str(error).encode("utf-8")


# ---------------------------------------------------------------- entries skipped in a walk


def test_find_images_reports_links_and_other_files_found_in_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "in"
    good = touch_png(root / "good.png")
    touch_png(root / "sub" / "deep.png")
    (root / "notes.txt").write_text("x")
    (root / ".hidden.txt").write_text("x")  # hidden: skipped without a word
    (root / "broken.png").symlink_to("missing.png")
    (root / "loop.png").symlink_to("loop.png")
    (root / "ping.tif").symlink_to("pong.tif")
    (root / "pong.tif").symlink_to("ping.tif")
    (root / "linked").symlink_to(root / "sub", target_is_directory=True)
    (root / "alias.png").symlink_to("good.png")  # a link to a good file is a good file
    sources, errors = find_images([root])
    assert [s.name for s in sources] == ["alias.png", "good.png", "sub/deep.png"]
    assert [(e.path.name, e.problem) for e in errors] == [
        ("broken.png", "broken symbolic link (points to missing.png, which does not exist)"),
        ("linked", "symbolic link to a directory (not followed; give the directory itself)"),
        ("loop.png", "symbolic link loop"),
        ("notes.txt", UNSUPPORTED_TXT),
        ("ping.tif", "symbolic link loop"),
        ("pong.tif", "symbolic link loop"),
    ]
    assert str(errors[0]) == f"{root}/broken.png: broken symbolic link (points to missing.png, which does not exist)"
    assert sources[1] == ImageSource(good, "good.png")


def test_find_images_names_link_problems_of_files_given_directly(tmp_path: Path) -> None:
    (tmp_path / "broken.png").symlink_to("missing.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    sources, errors = find_images([tmp_path / "broken.png", tmp_path / "loop.png", tmp_path / "gone.png"])
    assert sources == []
    assert [e.problem for e in errors] == [
        "broken symbolic link (points to missing.png, which does not exist)",
        "symbolic link loop",
        "no such file or directory",
    ]


# ---------------------------------------------------------------- decompression bombs


def with_claimed_size(source: Path, path: Path, width: int, height: int) -> Path:
    """Copy the small image `source` to `path` with a header that claims width x height (CRC fixed for PNG)."""
    data = bytearray(source.read_bytes())
    if data.startswith(b"\x89PNG"):
        data[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC of type + 13 data bytes
    else:  # BMP: BITMAPINFOHEADER width and height
        data[18:26] = struct.pack("<ii", width, height)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
@pytest.mark.parametrize("side", [10_000, 20_000])  # over Pillow's warning (89 M) and error (179 M) thresholds
def test_image_over_pillows_bomb_limit_gets_the_projects_limit_message(tmp_path: Path, fmt: str, side: int) -> None:
    small = tmp_path / f"small.{fmt.lower()}"
    Image.new("L", (1, 1)).save(small, format=fmt)
    path = with_claimed_size(small, tmp_path / f"big.{fmt.lower()}", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageError) as excinfo:
            decode_image(path, 8, 8)
    assert excinfo.value.problem == (
        f"image too large: {side}x{side} = {side * side} pixels exceeds the limit of 67108864 pixels (64 megapixels)"
    )
    assert str(excinfo.value) == f"{path}: {excinfo.value.problem}"


def test_pillows_bomb_limit_does_not_override_a_higher_limit(tmp_path: Path) -> None:
    """Only max_pixels decides: a header over Pillow's limit but within max_pixels is read on (here: truncated)."""
    small = tmp_path / "small.png"
    Image.new("L", (1, 1)).save(small)
    path = with_claimed_size(small, tmp_path / "big.png", 20_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as excinfo:
            decode_image(path, 8, 8, max_pixels=300_000_000)
    assert "too large" not in excinfo.value.problem
    assert excinfo.value.problem.startswith("corrupt or truncated PNG file")
