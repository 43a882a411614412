"""Find, validate and decode user images into the engine's input format.

This is the pure decoding stage of ``producer enqueue``: it touches no Redis.
Every image becomes a C-contiguous ``uint8`` array of shape ``(height, width)``
(grayscale, 0..255) at the engine's input size.

Decoding rules
--------------
* Format is detected from the file's content (magic bytes), not its suffix.
  TIFF is read with tifffile; PNG, JPEG and BMP with Pillow (other formats are
  refused).  Only single images are accepted: multi-page TIFFs, TIFF volumes
  and animated PNGs are rejected.  Images above ``MAX_PIXELS`` pixels
  (height * width) are rejected before their pixel data is decoded.
* EXIF orientation is applied for Pillow formats (JPEG, and PNG if it carries
  one), so sizes refer to the image as displayed.  TIFF orientation tags are
  ignored.
* Colour -> grayscale by ITU-R 601 luma, ``0.299 R + 0.587 G + 0.114 B``,
  computed exactly as Pillow's ``convert("L")`` does (16-bit fixed point,
  rounded), for Pillow images and TIFF arrays alike.  Alpha is ignored (not
  composited), palettes are expanded first, gray+alpha keeps the gray channel.
  Channels are scaled to 8 bit *before* the luma step.  TIFF: photometric RGB
  -> luma of the first three samples; MINISBLACK with extra samples -> first
  sample; MINISWHITE is inverted (``255 - value``); palette TIFFs go through
  their 16-bit colormap.
* Bit depth, all fixed (never per-image) except out-of-range floats:
  8-bit as is; bool/1-bit -> 0/255; unsigned 16-bit (PNG ``I;16``, Pillow
  ``I``, uint16 TIFF) -> ``round(value / 257)`` (65535 -> 255); other integer
  types -> ``round(value * 255 / max)`` where ``max`` is the dtype maximum
  (for TIFF, ``2**BitsPerSample - 1`` when fewer bits are used), negative
  values rejected; float -> ``round(value * 255)`` when all values lie in
  [0, 1], otherwise min-max normalised per image to 0..255 (a constant image
  becomes 0); NaN or infinite values rejected.  Rounding is half-up.
* 16-bit RGB(A) PNGs are reduced to 8 bit by Pillow itself (high byte).
* Resize to the target ``(height, width)`` with Pillow ``BILINEAR`` on the
  8-bit image (Pillow antialiases when shrinking); the aspect ratio is not
  kept (stretch).  When the size already matches, pixels are returned
  bit-exactly.  The original (oriented) size is kept in ``DecodedImage`` so the
  mask can be brought back with :func:`resize_mask` (nearest neighbour).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin

from common import png

if TYPE_CHECKING:  # imported where a TIFF is read: it takes 0.23 s of the producer's 0.9 s start-up on the H200 host
    import tifffile

__all__ = [
    "MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "DecodedImage",
    "ImageError",
    "ImageSource",
    "decode_image",
    "find_images",
    "printable",
    "read_png_as_is",
    "resize_mask",
]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
)
"""File suffixes accepted (lower case; matching is case-insensitive)."""

MAX_PIXELS: int = 64 * 1024 * 1024
"""Default limit on ``height * width`` of a source image (pixels), ~8192x8192.

This is the one limit enforced: Pillow's own decompression-bomb check (another
number, with a warning between its two thresholds) is not used; the header's
size is checked against ``max_pixels`` before any pixel data is decoded."""

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)

# Pillow mode -> chain of convert() modes that yields 8-bit "L".  P/PA go via
# RGBA so that the palette (and any transparency) is expanded first; alpha is
# then dropped by the RGBA -> L step.
_PIL_TO_L: dict[str, tuple[str, ...]] = {
    "L": (),
    "1": ("L",),
    "LA": ("L",),
    "P": ("RGBA", "L"),
    "PA": ("RGBA", "L"),
    "RGB": ("L",),
    "RGBA": ("L",),
    "RGBX": ("L",),
    "CMYK": ("RGB", "L"),
    "YCbCr": ("RGB", "L"),
}
# Pillow modes whose numbers go through the numpy bit-depth rules.
_PIL_NUMERIC = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

# Lone surrogates: what a str holds that UTF-8 cannot encode.
_SURROGATES = re.compile("[\ud800-\udfff]")

# ITU-R 601 luma in 16-bit fixed point, exactly as Pillow's convert("L").
_LUMA_R, _LUMA_G, _LUMA_B, _LUMA_HALF = 19595, 38470, 7471, 0x8000


class ImageError(Exception):
    """A user image that cannot be used, with the reason.

    Attributes:
        path: the offending file or directory, as given or found.
        problem: human-readable, specific description of what is wrong.

    ``str(error)`` is ``"<path>: <problem>"``, always encodable as UTF-8:
    bytes of a file name that are not valid UTF-8 are shown escaped
    (``caf\\xe9.png``); ``path`` keeps the name as the file system has it.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = printable(problem)
        super().__init__(f"{printable(os.fspath(path))}: {self.problem}")

    def __reduce__(self) -> tuple[type[ImageError], tuple[Path, str]]:
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class ImageSource:
    """One image file to enqueue.

    Attributes:
        path: the file on disk.
        name: relative POSIX path naming the result mask: the file name for a
            file given directly, the path relative to the directory argument
            for files found inside a directory.
    """

    path: Path
    name: str


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image ready for the engine.

    Attributes:
        pixels: ``uint8`` array, shape ``(height, width)`` at the target size,
            C-contiguous, grayscale 0..255, owned by this object.
        original_height: height in pixels of the source image (after EXIF
            orientation); the mask is resized back to this.
        original_width: width in pixels of the source image (after EXIF
            orientation).

    Compares by identity (``eq=False``): arrays have no boolean ``==``.
    """

    pixels: np.ndarray
    original_height: int
    original_width: int

    def __post_init__(self) -> None:
        p = self.pixels
        if p.dtype != np.uint8 or p.ndim != 2 or not p.flags.c_contiguous:
            raise ValueError(
                f"pixels must be a C-contiguous uint8 (height, width) array, "
                f"got {p.dtype} shape {p.shape}"
            )
        if self.original_height <= 0 or self.original_width <= 0:
            raise ValueError("original size must be positive")


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with its lone surrogates escaped, so that it always encodes as UTF-8.

    A file-name byte that is not valid UTF-8 (decoded by Python as a
    surrogate escape, U+DC80..U+DCFF) is shown as ``\\xNN``; any other lone
    surrogate as ``\\uNNNN``.
    """
    return _SURROGATES.sub(_escape_surrogate, text)


def _is_utf8(name: str) -> bool:
    """Whether a file name (as os.fsdecode gives it) came from valid UTF-8 bytes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _BadPixels(Exception):
    """Internal: the pixel array cannot be converted (message = problem)."""


# --------------------------------------------------------------------------
# Finding files


def _suffix_ok(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def _supported_text() -> str:
    return ", ".join(sorted(SUPPORTED_SUFFIXES))


def _unsupported_type(path: Path) -> str:
    shown = f"'{path.suffix}'" if path.suffix else "(no suffix)"
    return f"unsupported file type {shown} (supported: {_supported_text()})"


def _link_problem(path: Path, error: OSError) -> str:
    """Why ``path`` (a name that exists) cannot be followed to a file."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    try:
        target = os.readlink(path)
    except OSError:  # not a symbolic link (or no longer one)
        return f"cannot read file: {error.strerror or error}"
    return f"broken symbolic link (points to {printable(target)}, which does not exist)"


def _file_problem(path: Path) -> str | None:
    """Why the non-directory ``path`` cannot be enqueued, or None if it can.

    Checked in order: file name not valid UTF-8, broken symbolic link or link
    loop, not a regular file, unsupported suffix.
    """
    if not _is_utf8(path.name):
        return "file name is not valid UTF-8; rename it"
    try:
        mode = path.stat().st_mode
    except OSError as error:
        return _link_problem(path, error)
    if not stat.S_ISREG(mode):
        return "not a regular file or directory"
    if not _suffix_ok(path):
        return _unsupported_type(path)
    return None


def _directory_problem(path: Path) -> str | None:
    """Why the subdirectory ``path`` met in a walk is not searched, or None."""
    if not _is_utf8(path.name):
        return "directory name is not valid UTF-8; rename it"
    if path.is_symlink():
        return "symbolic link to a directory (not followed; give the directory itself)"
    return None


def _walk_directory(root: Path) -> tuple[list[ImageSource], list[ImageError]]:
    """Images under ``root`` sorted by name, and every entry not taken, sorted by path.

    Hidden files and directories (name starting with ".") are skipped
    silently.  Anything else that is not a supported image is reported: other
    suffixes, broken symbolic links, link loops, symlinked directories (not
    followed), unreadable directories and names that are not valid UTF-8.
    """
    found: list[ImageSource] = []
    problems: list[ImageError] = []

    def visit(directory: Path, prefix: str) -> None:
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as error:
            problems.append(ImageError(directory, f"cannot read directory: {error.strerror}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            try:
                is_dir = entry.is_dir()  # follows a symbolic link, which _directory_problem then refuses
            except OSError:  # a link loop: _file_problem names it
                is_dir = False
            if is_dir:
                problem = _directory_problem(path)
                if problem is None:
                    visit(path, f"{prefix}{entry.name}/")
                    continue
            elif entry.is_file(follow_symlinks=False) and _is_utf8(entry.name) and _suffix_ok(path):
                problem = None  # a regular file, known from the directory listing: no stat needed
            else:
                problem = _file_problem(path)
            if problem is None:
                found.append(ImageSource(path, f"{prefix}{entry.name}"))
            else:
                problems.append(ImageError(path, problem))

    visit(root, "")
    found.sort(key=lambda s: s.name)
    problems.sort(key=lambda e: os.fsencode(e.path))
    return found, problems


def _expand(path: Path) -> tuple[list[ImageSource], list[ImageError]]:
    """Sources for one command-line argument, and the errors it causes."""
    if path.is_dir():
        found, problems = _walk_directory(path)
        if not found:
            problems.append(ImageError(
                path, f"no supported images in directory (looked for {_supported_text()})"
            ))
        return found, problems
    if not os.path.lexists(path):
        return [], [ImageError(path, "no such file or directory")]
    problem = _file_problem(path)
    if problem is not None:
        return [], [ImageError(path, problem)]
    return [ImageSource(path, path.name)], []


def find_images(paths: Sequence[Path]) -> tuple[list[ImageSource], list[ImageError]]:
    """Expand files and directories into image sources.

    Arguments are processed in order; a directory is searched recursively and
    its files are listed sorted by their relative name.  Hidden entries (name
    starting with ".") inside a directory are skipped silently.  Everything
    else that is not taken is reported as an error: a missing path, a file
    with an unsupported suffix (given directly or found in a directory), a
    broken symbolic link, a symbolic link loop, a symlinked directory (not
    followed), something that is not a regular file, a file or directory name
    that is not valid UTF-8 (names are stored in Redis as UTF-8), a directory
    without supported images, and a name already produced by an earlier
    argument ("duplicate name ...").

    Returns:
        ``(sources, errors)``: sources in a deterministic order, and the
        errors in the order met (sorted by path within a directory).  Pixel
        data is not read.
    """
    sources: list[ImageSource] = []
    errors: list[ImageError] = []
    taken: dict[str, Path] = {}
    for arg in paths:
        found, problems = _expand(Path(arg))
        errors.extend(problems)
        for source in found:
            if source.name in taken:
                errors.append(
                    ImageError(
                        source.path,
                        f"duplicate name '{source.name}' (already used by "
                        f"{taken[source.name]})",
                    )
                )
                continue
            taken[source.name] = source.path
            sources.append(source)
    return sources, errors


# --------------------------------------------------------------------------
# Pixel rules (pure numpy)


def _round_half_up(values: np.ndarray) -> np.ndarray:
    """float array with values in [0, 255] -> uint8, rounding halves up."""
    return np.floor(values + 0.5).astype(np.uint8)


def _scale_channel(array: np.ndarray, max_value: int | None = None) -> np.ndarray:
    """Bit-depth rule: any numeric array -> uint8 of the same shape.

    ``max_value`` overrides the dtype maximum for integer arrays (TIFF with
    fewer BitsPerSample than the dtype holds).
    """
    kind = array.dtype.kind
    if array.dtype == np.bool_:
        return np.where(array, np.uint8(255), np.uint8(0))
    if array.dtype == np.uint8 and max_value in (None, 255):
        return array.astype(np.uint8, copy=False)
    if kind in "ui":
        if kind == "i" and array.min() < 0:
            raise _BadPixels(
                f"signed {array.dtype} image has negative values (min {array.min()}); "
                "only non-negative integers are supported"
            )
        top = int(max_value if max_value is not None else np.iinfo(array.dtype).max)
        if array.dtype.itemsize > 4:  # 64-bit: integer maths below could overflow
            scaled = array.astype(np.float64) * (255.0 / top)
            return _round_half_up(np.minimum(scaled, 255.0))
        work = np.uint32 if array.dtype.itemsize <= 2 else np.uint64
        values = np.minimum(array.astype(work), work(top))
        # round_half_up(v * 255 / top) in exact integer arithmetic
        return ((values * 510 + top) // (2 * top)).astype(np.uint8)
    if kind == "f":
        values = array.astype(np.float64)
        if np.isnan(values).any():
            raise _BadPixels(f"{array.dtype} image contains NaN values")
        if np.isinf(values).any():
            raise _BadPixels(f"{array.dtype} image contains infinite values")
        low, high = values.min(), values.max()
        if low >= 0.0 and high <= 1.0:
            return _round_half_up(values * 255.0)
        if high == low:
            return np.zeros(array.shape, np.uint8)
        return _round_half_up((values - low) * (255.0 / (high - low)))
    raise _BadPixels(f"unsupported pixel type {array.dtype}")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 (h, w, >=3) -> uint8 (h, w): ITU-R 601 luma, Pillow-exact."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * _LUMA_R + g * _LUMA_G + b * _LUMA_B + _LUMA_HALF) >> 16).astype(np.uint8)


def _to_gray_uint8(array: np.ndarray, max_value: int | None = None) -> np.ndarray:
    """(h, w) or (h, w, c) numeric array -> uint8 (h, w) grayscale.

    c == 1: squeezed; c == 2 (gray + alpha): first channel; c in (3, 4)
    (RGB, RGBA): luma of the 8-bit-scaled RGB, alpha ignored.
    """
    if array.ndim not in (2, 3):
        raise _BadPixels(
            f"too many dimensions: shape {array.shape}; expected (height, width) "
            "or (height, width, channels)"
        )
    if array.size == 0 or 0 in array.shape:
        raise _BadPixels(f"zero-size image (shape {array.shape})")
    if array.ndim == 3:
        channels = array.shape[2]
        if channels not in (1, 2, 3, 4):
            raise _BadPixels(f"unsupported number of channels: {channels} (expected 1 to 4)")
        if channels >= 3:
            return _luma(_scale_channel(array[..., :3], max_value))
        array = array[..., 0]
    return _scale_channel(array, max_value)


def _resize_gray(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w) -> uint8 (height, width), Pillow BILINEAR; identity if equal."""
    if gray.shape == (height, width):
        return gray
    image = Image.fromarray(gray)
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a label mask back to the original image size.

    Args:
        mask: ``uint8`` array of shape ``(h, w)`` (class labels or 0/255).
        height, width: target size in pixels (the ``DecodedImage.original_*``).

    Returns:
        A new C-contiguous ``uint8`` array ``(height, width)``, resized with
        Pillow ``NEAREST`` so that only values present in ``mask`` occur.

    Raises:
        ValueError: wrong dtype/shape or non-positive size.
    """
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be a uint8 (h, w) array, got {mask.dtype} {mask.shape}")
    _check_size_args(height, width)
    if mask.shape == (height, width):
        return np.array(mask, dtype=np.uint8, order="C")
    resized = Image.fromarray(np.ascontiguousarray(mask)).resize(
        (width, height), Image.Resampling.NEAREST
    )
    return np.array(resized, dtype=np.uint8, order="C")


def _check_size_args(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")


# --------------------------------------------------------------------------
# File decoding


def _sniff(path: Path) -> str:
    """Format name from the first bytes; ImageError if unreadable/unknown."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise ImageError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    raise ImageError(path, "not a PNG, JPEG, BMP or TIFF image (content not recognised)")


def _check_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    """ImageError unless ``height * width`` is within ``max_pixels`` (the project's limit)."""
    if height * width > max_pixels:
        megapixels = f" ({max_pixels // 2**20} megapixels)" if max_pixels % 2**20 == 0 else ""
        raise ImageError(
            path,
            f"image too large: {width}x{height} = {height * width} pixels "
            f"exceeds the limit of {max_pixels} pixels{megapixels}",
        )


# Pillow's openers for the formats _sniff names: what Image.open(formats=[fmt])
# calls, minus Image.open's own decompression-bomb check (MAX_IMAGE_PIXELS).
_PILLOW_OPENERS: dict[str, Callable[..., ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.jpeg_factory,  # a JPEG, or an MPO (camera JPEG + previews)
    "BMP": BmpImagePlugin.BmpImageFile,
}


def _open_pillow(path: Path, fmt: str) -> ImageFile.ImageFile:
    """Parse the header of a PNG/JPEG/BMP (no pixel data read); ImageError if corrupt.

    Pillow's decompression-bomb check is not run: the caller checks the size
    against ``max_pixels`` before loading, so that limit alone applies.
    """
    try:
        return _PILLOW_OPENERS[fmt](path)
    except (SyntaxError, IndexError, TypeError, struct.error) as exc:  # Pillow's "not parsable"
        raise ImageError(path, f"corrupt {fmt} file: header cannot be parsed") from exc
    except Exception as exc:  # untrusted input: any decoder failure is the file's
        raise ImageError(path, f"corrupt {fmt} file: {exc}") from exc


def _read_pillow(path: Path, fmt: str, max_pixels: int) -> np.ndarray:
    """PNG/JPEG/BMP -> uint8 (h, w) grayscale at the original (oriented) size."""
    image = _open_pillow(path, fmt)
    with image:
        _check_pixels(path, image.height, image.width, max_pixels)
        try:
            frames = getattr(image, "n_frames", 1)
        except Exception as exc:  # untrusted input: any decoder failure is the file's
            raise ImageError(path, f"corrupt {fmt} file: {exc}") from exc
        if frames != 1 and image.format != "MPO":  # MPO: camera JPEG + previews
            raise ImageError(
                path, f"animated {fmt} with {frames} frames: save a single frame instead"
            )
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)
        except Exception as exc:  # untrusted input: any decoder failure is the file's
            raise ImageError(path, f"corrupt or truncated {fmt} file: {exc}") from exc
    mode = oriented.mode
    if mode in _PIL_TO_L:
        for step in _PIL_TO_L[mode]:
            oriented = oriented.convert(step)
        return np.asarray(oriented)
    if mode in _PIL_NUMERIC:
        array = np.asarray(oriented)
        if mode == "I":  # Pillow's 32-bit container for 16-bit samples
            if array.min() < 0 or array.max() > 65535:
                raise ImageError(
                    path, "32-bit integer pixels outside 0..65535 (expected 16-bit data)"
                )
            array = array.astype(np.uint16)
        try:
            return _to_gray_uint8(array)
        except _BadPixels as exc:
            raise ImageError(path, str(exc)) from exc
    raise ImageError(path, f"unsupported image mode {mode!r} ({fmt})")


def _tiff_decodable(page: tifffile.TiffPage) -> bool:
    """Whether tifffile can decompress this page with the installed codecs."""
    import tifffile

    try:
        return page.compression in tifffile.TIFF.DECOMPRESSORS
    except Exception:  # tifffile may raise ImportError for optional codecs
        return False


def _tiff_pixels(path: Path, page: tifffile.TiffPage, data: np.ndarray) -> np.ndarray:
    """TIFF page array -> uint8 (h, w) using the page's photometric tag."""
    import tifffile

    photometric = tifffile.PHOTOMETRIC
    if page.axes == "SYX":  # planar configuration: move samples last
        data = np.moveaxis(data, 0, -1)
    bits = int(page.bitspersample)
    max_value = (
        2**bits - 1 if data.dtype.kind in "ui" and bits < data.dtype.itemsize * 8 else None
    )
    kind = page.photometric
    try:
        if kind in (photometric.MINISBLACK, photometric.MINISWHITE):
            gray = _to_gray_uint8(data[..., 0] if data.ndim == 3 else data, max_value)
            return 255 - gray if kind == photometric.MINISWHITE else gray
        if kind == photometric.RGB:
            if data.ndim != 3 or data.shape[2] < 3:
                raise _BadPixels(f"RGB TIFF with shape {data.shape}: expected 3 samples")
            return _to_gray_uint8(data[..., :3], max_value)
        if kind == photometric.PALETTE:
            colormap = page.colormap
            if colormap is None or data.ndim != 2 or data.dtype.kind not in "ui":
                raise _BadPixels("palette TIFF without a usable colormap")
            if data.max() >= colormap.shape[1]:
                raise _BadPixels(f"palette index {data.max()} outside the colormap")
            rgb = np.moveaxis(colormap[:, data], 0, -1)  # TIFF colormaps are 16-bit
            return _to_gray_uint8(rgb.astype(np.uint16))
    except _BadPixels as exc:
        raise ImageError(path, str(exc)) from exc
    name = getattr(kind, "name", str(kind))
    raise ImageError(path, f"unsupported TIFF photometric interpretation {name}")


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    """Single-page TIFF -> uint8 (h, w) grayscale at the original size."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # untrusted input: any parser failure is the file's
        raise ImageError(path, f"corrupt TIFF file: {exc}") from exc
    with tif:
        try:
            pages = len(tif.pages)
            page = tif.pages[0] if pages else None
        except Exception as exc:
            raise ImageError(path, f"corrupt TIFF file: {exc}") from exc
        if not isinstance(page, tifffile.TiffPage):
            raise ImageError(path, "TIFF file contains no image")
        if pages > 1:
            raise ImageError(
                path, f"multi-page TIFF with {pages} pages: split it into single images"
            )
        if page.imagelength == 0 or page.imagewidth == 0:
            raise ImageError(path, f"zero-size image ({page.imagewidth}x{page.imagelength})")
        if page.axes not in ("YX", "YXS", "SYX"):
            raise ImageError(
                path,
                f"too many dimensions: TIFF page has shape {page.shape} (axes "
                f"{page.axes}); only 2-D images are supported (volumes are not)",
            )
        _check_pixels(path, page.imagelength, page.imagewidth, max_pixels)
        if not _tiff_decodable(page):
            raise ImageError(
                path,
                f"TIFF compression {getattr(page.compression, 'name', page.compression)} "
                "cannot be decoded (needs the optional 'imagecodecs' package)",
            )
        try:
            data = page.asarray()
        except Exception as exc:  # untrusted input: any decoder failure is the file's
            raise ImageError(path, f"corrupt or truncated TIFF data: {exc}") from exc
        return _tiff_pixels(path, page, data)


def decode_image(
    path: Path, height: int, width: int, *, max_pixels: int = MAX_PIXELS
) -> DecodedImage:
    """Decode one image file into engine input (see the module rules).

    Args:
        path: image file (PNG, JPEG, BMP or single-page TIFF, by content).
        height, width: engine input size in pixels (positive).
        max_pixels: limit on the source's ``height * width``.

    Returns:
        ``DecodedImage`` with ``uint8`` pixels of shape ``(height, width)`` and
        the source's (oriented) size.

    Raises:
        ImageError: the file is empty, unreadable, not a supported image,
            corrupt or truncated, too large, multi-page/animated, a volume,
            of an unsupported mode/type/channel count, zero-size, or holds
            NaN/infinite/negative values.
        ValueError: non-positive target size (a programming error).
    """
    _check_size_args(height, width)
    path = Path(path)
    fmt = _sniff(path)
    gray = _read_tiff(path, max_pixels) if fmt == "TIFF" else _read_pillow(path, fmt, max_pixels)
    return fit_decoded(gray, height, width)


def fit_decoded(gray: np.ndarray, height: int, width: int) -> DecodedImage:
    """A decoded page (uint8 (h, w) grayscale at its original, oriented size) as engine input: resized to
    height x width as :func:`decode_image` resizes (a new C-contiguous array), with its original size kept."""
    original_height, original_width = gray.shape
    pixels = np.array(_resize_gray(gray, height, width), dtype=np.uint8, order="C")
    return DecodedImage(pixels, int(original_height), int(original_width))


def read_png_as_is(path: Path, height: int, width: int) -> bytes | None:
    """The bytes of a PNG file whose pixels already are the engine input, else None.

    "Already the engine input": 8-bit grayscale, not interlaced, exactly ``height x width``, one
    frame, no EXIF orientation, and every chunk intact (CRC-checked; see common/png.py). Then
    :func:`decode_image` would return exactly the file's samples, so the file can be stored as it
    is and decoded once, by the worker. None for anything else, including an unreadable or damaged
    file: :func:`decode_image` then decodes it or names its problem. Only the first 33 bytes are
    read from a file that does not qualify by its header.
    """
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(png.HEADER_BYTES)
            png.check_header(head, height, width)
            data = head + handle.read()
        png.check_engine_input(data, height, width)
    except (OSError, png.PngStructureError):
        return None
    return data
