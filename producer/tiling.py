"""Enqueue side of tiling: how many engine inputs a file becomes, and storing a file as tiles of a tiled image.

`--fit tile` (the default): a single page of exactly the engine's size is stored as one ordinary
image, as before; any other page is cut into engine-sized tiles with `--tile-overlap` px shared
(common/tiles.py), padded by reflection where it is smaller than the engine input. `--fit resize`:
each page is resized to the engine input (the study's behaviour). A multi-page TIFF is a stack: each
page is stored as tiles (or, with resize, as one resized record), and its masks come back as one
multi-page TIFF (producer/collect_tiled.py).

A tiled file is read one page at a time and its tiles are stored STORE_TILES at a time, so a large
image or a stack is never held whole: at most one decoded page and STORE_TILES encoded tiles. If a
page turns out bad, the tiles already stored for the file are deleted and the file is rejected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.payloads import encode_image
from broker.store import EncodedImage, QueueStore, new_image_id, now
from broker.tiled import FIT_RESIZE, FIT_TILE, TiledImage
from common.images import ImageError, ImageSource, _resize_gray
from common.pages import MAX_PAGES, PageShape, probe_pages, read_pages
from common.tiles import cut_tiles, plan_tiles, tile_id

DEFAULT_OVERLAP = 64  # px shared by neighbouring tiles: wider than the demo U-Net's cells (6-22 px radius)
STORE_TILES = 32  # encoded tiles held before one Redis round trip stores them


@dataclass(frozen=True)
class Fitting:
    """How a file that is not one page of the engine's size becomes engine inputs.

    mode: "tile" or "resize". overlap: px shared by neighbouring tiles; None: DEFAULT_OVERLAP, or a quarter
    of the engine input's side for engines smaller than 256 px (`for_engine`). max_pages: pages allowed per file.
    """

    mode: str = FIT_TILE
    overlap: int | None = None
    max_pages: int = MAX_PAGES

    def __post_init__(self) -> None:
        if self.mode not in (FIT_TILE, FIT_RESIZE):
            raise ValueError(f"fit must be {FIT_TILE!r} or {FIT_RESIZE!r}, got {self.mode!r}")
        if (self.overlap is not None and self.overlap < 0) or self.max_pages < 1:
            raise ValueError(f"overlap must be >= 0 and max_pages >= 1, got {self.overlap} and {self.max_pages}")

    def for_engine(self, height: int, width: int) -> Fitting:
        """This fitting with its overlap set for a height x width engine; ValueError unless the overlap is less
        than half the engine input (tiles must advance)."""
        overlap = min(DEFAULT_OVERLAP, min(height, width) // 4) if self.overlap is None else self.overlap
        if self.mode == FIT_TILE and overlap >= min(height, width) // 2:
            raise ValueError(f"--tile-overlap {overlap} must be less than half the engine input ({height}x{width})")
        return Fitting(self.mode, overlap, self.max_pages)

    @property
    def tile_overlap(self) -> int:
        """The overlap in px (DEFAULT_OVERLAP until `for_engine` has set it)."""
        return DEFAULT_OVERLAP if self.overlap is None else self.overlap


TILE = Fitting()  # the default: tiles with DEFAULT_OVERLAP
RESIZE = Fitting(FIT_RESIZE)  # the study's behaviour: every page resized to the engine input


@dataclass(frozen=True)
class StoredUnit:
    """One file as stored: its id (an image id, or a tiled image's parent id), name, and records (engine inputs)."""

    unit_id: str
    name: str
    records: int
    tiled: bool


def is_tiled(shape: PageShape, height: int, width: int, fitting: Fitting) -> bool:
    """Whether a file of this shape is stored as a tiled image (else as one ordinary image record)."""
    return shape.pages > 1 or (fitting.mode == FIT_TILE and (shape.height, shape.width) != (height, width))


def record_count(shape: PageShape, height: int, width: int, fitting: Fitting) -> int:
    """Engine inputs a file of this shape becomes."""
    if not is_tiled(shape, height, width, fitting) or fitting.mode == FIT_RESIZE:
        return shape.pages
    return shape.pages * plan_tiles(shape.height, shape.width, height, width, fitting.tile_overlap).count


def file_records(path: Path, height: int, width: int, fitting: Fitting) -> int:
    """Engine inputs a file becomes, from its headers only; 1 for a file that cannot be read (it is rejected).

    For a square engine input the count does not depend on the file's EXIF orientation (a quarter turn swaps
    the rows and columns of tiles), so it is not read: for a PNG that would mean decoding all its pixels.
    """
    try:
        shape = probe_pages(path, max_pages=fitting.max_pages, oriented=height != width)
    except ImageError:
        return 1
    return record_count(shape, height, width, fitting)


def store_tiled(store: QueueStore, source: ImageSource, shape: PageShape, height: int, width: int,
                fitting: Fitting,
                pages: Iterable[np.ndarray] | None = None) -> tuple[list[tuple[str, str]], StoredUnit]:
    """Store a file as a tiled image: its tiles' records (in the manifest) and its `tiled` record.

    pages: the file's pages already decoded (uint8 gray at the original size, as common.pages.read_pages gives
    them: a PNG, JPEG or BMP decoded once to learn its oriented shape); None: read from the file page by page.
    Returns the (record id, name) of every tile, in index order (what the jobs name), and the unit.
    ImageError names the file (and page) if a page cannot be read; its stored tiles are deleted first.
    """
    parent = TiledImage(new_image_id(), source.name, shape.height, shape.width, shape.pages, fitting.mode,
                        height, width, fitting.tile_overlap, now())
    stored: list[tuple[str, str]] = []
    pending: list[EncodedImage] = []
    try:
        for index, tile in enumerate(_engine_inputs(source.path, parent, fitting, pages)):
            record = tile_id(parent.parent_id, index)
            name = f"{source.name} [{parent.where(index)}]"
            pending.append(EncodedImage(record, name, encode_image(tile), height, width, parent.enqueued_at))
            stored.append((record, name))
            if len(pending) >= STORE_TILES:
                store.store_encoded(pending)
                pending = []
        store.store_encoded(pending)
        store.save_tiled(parent.parent_id, parent.to_json())
    except ImageError:
        store.forget([record for record, _ in stored], tiled=[parent.parent_id])
        raise
    if len(stored) != parent.records:
        store.forget([record for record, _ in stored], tiled=[parent.parent_id])
        raise ImageError(source.path, f"{len(stored)} pages and tiles read, its headers promise {parent.records}")
    return stored, StoredUnit(parent.parent_id, source.name, parent.records, tiled=True)


def _engine_inputs(path: Path, parent: TiledImage, fitting: Fitting,
                   pages: Iterable[np.ndarray] | None) -> Iterator[np.ndarray]:
    """Every engine input of the file in record order, one page decoded at a time (or from `pages`)."""
    layout = parent.layout
    for page in read_pages(path, max_pages=fitting.max_pages) if pages is None else pages:
        if page.shape != (parent.height, parent.width):  # headers said otherwise (EXIF, a lying TIFF)
            raise ImageError(path, f"a page decodes to {page.shape[1]}x{page.shape[0]}, its header says "
                                   f"{parent.width}x{parent.height}")
        if parent.fit == FIT_RESIZE:
            yield np.ascontiguousarray(_resize_gray(page, parent.tile_h, parent.tile_w))
        else:
            yield from cut_tiles(page, layout)
