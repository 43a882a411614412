"""Collect for tiled images and stacks: stitch each page's tile masks back (common/tiles.py) and write the file.

A single page comes back as a PNG, as any image does (`a/big.tif` -> `OUT/a/big.png`); a stack as
one multi-page TIFF with the same page count and order (`a/stack.tif` -> `OUT/a/stack.tif`), each
page at the page's original size, 8-bit gray 0/255 like the PNGs, deflate-compressed. Pages are
stitched and written one at a time from their tiles' masks, read ROUND_TRIP_TILES at a time, so
neither a large image's tiles nor a whole stack's masks are held at once.

One failed tile fails its image, with the tile's reason and where it is ("page 2 of 5, tile 3 of 20");
an image with a tile not finished yet is pending. Nothing is written for either.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from broker.payloads import PayloadError
from broker.store import QueueStore
from broker.tiled import FIT_RESIZE, TiledImage
from common.images import MAX_PIXELS, resize_mask
from common.tiles import stitch

ROUND_TRIP_TILES = 64  # tile masks read per Redis round trip


class TileProblem(Exception):
    """A tile of a tiled image has no usable mask; the message says which tile and why."""


def stack_path(out_dir: Path, mask_png: Path) -> Path:
    """Where a stack's masks go: the PNG path collect would use, as .tif."""
    return mask_png.with_suffix(".tif")


def tiled_outcome(store: QueueStore, image: TiledImage, failures: dict[str, str]) -> tuple[bool, str | None]:
    """(every tile has an outcome, the first failed tile's reason or None)."""
    record_ids = image.record_ids()
    for index, record in enumerate(record_ids):
        if record in failures:
            return True, f"{image.where(index)}: {failures[record]}"
    return all(store.resolved(record_ids)), None


def write_tiled(store: QueueStore, image: TiledImage, png_path: Path, write_pixels) -> Path:
    """Stitch and write every page of a finished tiled image; returns the file written.

    png_path: where collect would put a single image's PNG. write_pixels(mask) turns class ids into the
    written gray levels. TileProblem if a tile mask cannot be read; MaskNotWritten-style OSError/ValueError
    from the file system are the caller's to translate. A partly written stack is removed on error.
    """
    if image.height * image.width > MAX_PIXELS:
        raise TileProblem(f"its stored page size {image.height}x{image.width} is over the {MAX_PIXELS}-pixel limit "
                          "that enqueue enforces: the record is malformed")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if image.pages == 1:
        Image.fromarray(write_pixels(_page_mask(store, image, 0))).save(png_path)
        return png_path
    import tifffile

    path = stack_path(png_path.parent, png_path)
    try:
        with tifffile.TiffWriter(path) as tiff:
            for page in range(image.pages):
                tiff.write(write_pixels(_page_mask(store, image, page)), photometric="minisblack",
                           compression="zlib", metadata=None)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _page_mask(store: QueueStore, image: TiledImage, page: int) -> np.ndarray:
    """One page's mask at its original size, uint8 (height, width) class ids."""
    masks = _tile_masks(store, image, page)
    if image.fit == FIT_RESIZE:
        return resize_mask(next(masks), image.height, image.width)
    return stitch(masks, image.layout)


def _tile_masks(store: QueueStore, image: TiledImage, page: int) -> Iterator[np.ndarray]:
    """The masks of one page's tiles, in order, read ROUND_TRIP_TILES at a time."""
    record_ids = image.record_ids(page)
    first = page * image.tiles_per_page
    for start in range(0, len(record_ids), ROUND_TRIP_TILES):
        chunk = record_ids[start:start + ROUND_TRIP_TILES]
        for offset, result in enumerate(store.load_results(chunk)):
            where = image.where(first + start + offset)
            if result.error is not None:
                raise TileProblem(f"{where}: {result.error}")
            if result.mask is None:
                raise TileProblem(f"{where}: its mask is gone from Redis")
            if result.mask.shape != (image.tile_h, image.tile_w):
                raise TileProblem(f"{where}: its mask is {result.mask.shape[1]}x{result.mask.shape[0]}, "
                                  f"expected {image.tile_w}x{image.tile_h}")
            yield result.mask


def load_tiled_images(store: QueueStore, parent_ids: list[str]) -> dict[str, TiledImage | str]:
    """The tiled records of these ids (one command): the image, or why its record cannot be used; ids that are not
    tiled images are left out."""
    found: dict[str, TiledImage | str] = {}
    for parent_id, raw in zip(parent_ids, store.load_tiled(parent_ids), strict=True):
        if raw is None:
            continue
        try:
            found[parent_id] = TiledImage.from_json(parent_id, raw)
        except PayloadError as exc:
            found[parent_id] = str(exc)
    return found
