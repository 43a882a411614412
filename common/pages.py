"""Reading an image file page by page at its original size: one page for PNG, JPEG, BMP and single TIFFs,
every page of a multi-page TIFF (a z-stack or time series of 2-D pages of one size).

The decoding rules (gray conversion, bit depth, orientation) are common/images.py's, applied to each
page; only the page count differs from `decode_image`, which refuses multi-page TIFFs. Pages are
decoded one at a time, so a stack is never held whole. Every header is checked before the first
page is decoded: page count (at most `max_pages`), one size for all pages, 2-D pages, the pixel
limit per page, and a codec that can decode each. A problem raises ImageError naming the file (and
the page, counted from 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ImageFile

from common.images import (
    MAX_PIXELS,
    ImageError,
    _check_pixels,
    _open_pillow,
    _read_pillow,
    _sniff,
    _tiff_decodable,
    _tiff_pixels,
)

MAX_PAGES = 1000
"""Default limit on the pages of one multi-page TIFF (each page counts against MAX_PIXELS on its own)."""

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees


@dataclass(frozen=True)
class PageShape:
    """A file's page count and the (oriented) size of each page, in pixels."""

    pages: int
    height: int
    width: int


def probe_pages(path: Path, *, max_pixels: int = MAX_PIXELS, max_pages: int = MAX_PAGES,
                oriented: bool = True) -> PageShape:
    """The file's page count and page size from its headers; ImageError if the file cannot be read or breaks a
    limit.

    oriented: the size as displayed, after a PNG's, JPEG's or BMP's EXIF orientation (height and width swapped
    for a quarter turn). Pillow finds a PNG's EXIF only by decoding all of its pixels (the chunk may follow the
    image data), so that costs a full decode; with oriented=False nothing but the headers is read, and the size
    is the one stored (what a caller gets who only needs height * width, or tiles of a square engine input).
    """
    path = Path(path)
    fmt = _sniff(path)
    if fmt == "TIFF":
        with _open_tiff(path) as tif:
            return _check_tiff(path, tif, max_pixels, max_pages)
    with _open_pillow(path, fmt) as image:
        turned = oriented and _turned(image)
        height, width = (image.width, image.height) if turned else (image.height, image.width)
    _check_pixels(path, height, width, max_pixels)
    return PageShape(1, height, width)


def probe_or_read(path: Path, *, max_pixels: int = MAX_PIXELS,
                  max_pages: int = MAX_PAGES) -> tuple[PageShape, np.ndarray | None]:
    """The file's page shape (oriented, as probe_pages gives it) and, for a PNG, JPEG or BMP, its one page decoded.

    A TIFF's shape comes from its headers alone (None for the page: read_pages decodes its pages one at a time).
    A PNG, JPEG or BMP always has one page, and its oriented size needs its EXIF orientation, which for a PNG
    costs a full decode (probe_pages): so it is decoded here, once, and the page (uint8 (height, width) gray at
    its original oriented size, as read_pages gives it) is returned for the caller to use instead of reading the
    file again. ImageError names the file and its problem.
    """
    path = Path(path)
    fmt = _sniff(path)
    if fmt == "TIFF":
        return probe_pages(path, max_pixels=max_pixels, max_pages=max_pages), None
    page = _read_pillow(path, fmt, max_pixels)
    return PageShape(1, int(page.shape[0]), int(page.shape[1])), page


def _turned(image: ImageFile.ImageFile) -> bool:
    """Whether the image's EXIF orientation turns it by a quarter turn (an unreadable EXIF block: not turned;
    decoding says what is wrong with the file)."""
    try:
        return image.getexif().get(_EXIF_ORIENTATION) in _SWAPS_AXES
    except Exception:
        return False


def read_pages(path: Path, *, max_pixels: int = MAX_PIXELS, max_pages: int = MAX_PAGES) -> Iterator[np.ndarray]:
    """Each page of the file in order, as uint8 (height, width) grayscale at its original size.

    Every header is checked before the first page is yielded; ImageError names the file and the problem.
    """
    path = Path(path)
    fmt = _sniff(path)
    if fmt != "TIFF":
        yield _read_pillow(path, fmt, max_pixels)
        return
    with _open_tiff(path) as tif:
        shape = _check_tiff(path, tif, max_pixels, max_pages)
        for number in range(shape.pages):
            page = tif.pages[number]
            try:
                data = page.asarray()
            except Exception as exc:  # untrusted input: any decoder failure is the file's
                raise ImageError(path, f"page {number + 1} of {shape.pages}: corrupt or truncated TIFF data: "
                                       f"{exc}") from exc
            gray = _tiff_pixels(path, page, data)
            yield np.ascontiguousarray(gray)


def _open_tiff(path: Path):
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except Exception as exc:  # untrusted input: any parser failure is the file's
        raise ImageError(path, f"corrupt TIFF file: {exc}") from exc


def _check_tiff(path: Path, tif, max_pixels: int, max_pages: int) -> PageShape:
    """Every page's header: a 2-D image, decodable, the first page's size, within the limits."""
    import tifffile

    try:
        pages = len(tif.pages)
    except Exception as exc:
        raise ImageError(path, f"corrupt TIFF file: {exc}") from exc
    if pages == 0:
        raise ImageError(path, "TIFF file contains no image")
    if pages > max_pages:
        raise ImageError(path, f"multi-page TIFF with {pages} pages: the limit is {max_pages} pages per file; "
                               "split the stack into several files")
    size: tuple[int, int] | None = None
    for number in range(pages):
        where = f"page {number + 1} of {pages}: " if pages > 1 else ""
        try:
            page = tif.pages[number]
        except Exception as exc:
            raise ImageError(path, f"{where}corrupt TIFF file: {exc}") from exc
        if not isinstance(page, tifffile.TiffPage):
            raise ImageError(path, f"{where}not an image page")
        if page.imagelength == 0 or page.imagewidth == 0:
            raise ImageError(path, f"{where}zero-size image ({page.imagewidth}x{page.imagelength})")
        if page.axes not in ("YX", "YXS", "SYX"):
            raise ImageError(path, f"{where}too many dimensions: TIFF page has shape {page.shape} (axes "
                                   f"{page.axes}); only 2-D pages are supported")
        if size is None:
            size = (page.imagelength, page.imagewidth)
            _check_pixels(path, *size, max_pixels)
        elif (page.imagelength, page.imagewidth) != size:
            raise ImageError(path, f"{where}size {page.imagewidth}x{page.imagelength} differs from page 1's "
                                   f"{size[1]}x{size[0]}: every page of a stack must have one size")
        if not _tiff_decodable(page):
            raise ImageError(path, f"{where}TIFF compression {getattr(page.compression, 'name', page.compression)} "
                                   "cannot be decoded (needs the optional 'imagecodecs' package)")
    assert size is not None
    return PageShape(pages, size[0], size[1])
