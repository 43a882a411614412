"""Cutting a page into engine-sized tiles and stitching the tiles' masks back: pure numpy, no Redis.

A page of height x width pixels becomes a grid of tile_h x tile_w tiles (the engine's input size).
Along each axis the tiles start every `tile - overlap` pixels, and the last one is moved back to
end exactly at the page's edge, so the overlap between the last two tiles can be larger than
`overlap`. An axis shorter than the tile has one tile, padded at its end by reflection (the image
is never stretched); the padding is cut off again when stitching.

Stitching: every output pixel comes from the tile in which it is furthest from an edge, per axis;
equivalently, from the tile whose centre is nearest (on a grid the nearest centre is the nearest
one along each axis). When two tiles are equally far, the earlier one (smaller origin) is kept.
Every pixel is covered by the tile it is taken from. A page of exactly the tile's size is one tile
whose mask is the page's mask, unchanged.

Tiles are numbered row by row: tile k is at row k // columns, column k % columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

TILE_SEPARATOR = "."  # a tile's record id is "<parent id>.<index>": plain image ids are hex and have no dot


def axis_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start of each tile along one axis of `length` pixels (tiles of `tile` px, at least `overlap` px shared)."""
    if length < 1 or tile < 1:
        raise ValueError(f"length and tile must be positive, got {length} and {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in 0..{tile - 1} px for {tile}-px tiles, got {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [min(index * stride, length - tile) for index in range(count)]


def axis_keep(origins: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Per tile along one axis, the [start, stop) range of page pixels taken from it (they tile 0..length).

    Pixel p goes to the tile whose centre origin + (tile - 1) / 2 is nearest (the earliest on a tie).
    """
    pixels = np.arange(length, dtype=np.int64)[:, None]
    centres_x2 = 2 * np.asarray(origins, dtype=np.int64)[None, :] + (tile - 1)
    owner = np.argmin(np.abs(2 * pixels - centres_x2), axis=1)  # argmin keeps the first on ties
    ranges = []
    for index in range(len(origins)):
        where = np.flatnonzero(owner == index)
        ranges.append((int(where[0]), int(where[-1]) + 1) if where.size else (0, 0))
    return ranges


@dataclass(frozen=True)
class TileLayout:
    """How one page (height x width px) is cut into tile_h x tile_w tiles with `overlap` px shared.

    rows, columns: tile origins (top rows, left columns) in page pixels.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int

    @property
    def rows(self) -> list[int]:
        return axis_origins(self.height, self.tile_h, self.overlap)

    @property
    def columns(self) -> list[int]:
        return axis_origins(self.width, self.tile_w, self.overlap)

    @property
    def count(self) -> int:
        """Tiles per page."""
        return len(self.rows) * len(self.columns)

    def origin(self, index: int) -> tuple[int, int]:
        """(top, left) of tile `index` in page pixels."""
        columns = self.columns
        return self.rows[index // len(columns)], columns[index % len(columns)]


def plan_tiles(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> TileLayout:
    """The layout of a height x width page for a tile_h x tile_w engine; ValueError on a bad size or overlap."""
    axis_origins(height, tile_h, overlap)  # validates both axes now, not at first use
    axis_origins(width, tile_w, overlap)
    return TileLayout(height, width, tile_h, tile_w, overlap)


def cut_tiles(page: np.ndarray, layout: TileLayout) -> Iterator[np.ndarray]:
    """The page's tiles in index order: C-contiguous uint8 (tile_h, tile_w) arrays, reflect-padded where the
    page is smaller than the tile along an axis."""
    if page.shape != (layout.height, layout.width):
        raise ValueError(f"page is {page.shape}, its layout says {(layout.height, layout.width)}")
    pad_h, pad_w = max(0, layout.tile_h - layout.height), max(0, layout.tile_w - layout.width)
    if pad_h or pad_w:
        page = np.pad(page, ((0, pad_h), (0, pad_w)), mode="reflect" if min(page.shape) > 1 else "edge")
    for top in layout.rows:
        for left in layout.columns:
            yield np.ascontiguousarray(page[top:top + layout.tile_h, left:left + layout.tile_w])


def stitch(masks: Iterable[np.ndarray], layout: TileLayout) -> np.ndarray:
    """One page's mask, uint8 (height, width), from its tiles' masks (uint8 (tile_h, tile_w), in index order)."""
    out = np.empty((layout.height, layout.width), dtype=np.uint8)
    rows = list(zip(layout.rows, axis_keep(layout.rows, layout.tile_h, layout.height), strict=True))
    columns = list(zip(layout.columns, axis_keep(layout.columns, layout.tile_w, layout.width), strict=True))
    seen = 0
    for index, mask in enumerate(masks):
        if index >= layout.count:
            raise ValueError(f"more than the layout's {layout.count} tile masks")
        if mask.shape != (layout.tile_h, layout.tile_w):
            raise ValueError(f"tile {index} mask is {mask.shape}, expected {(layout.tile_h, layout.tile_w)}")
        top, (y0, y1) = rows[index // len(columns)]
        left, (x0, x1) = columns[index % len(columns)]
        out[y0:y1, x0:x1] = mask[y0 - top:y1 - top, x0 - left:x1 - left]
        seen += 1
    if seen != layout.count:
        raise ValueError(f"{seen} tile masks for a layout of {layout.count}")
    return out


def tile_id(parent_id: str, index: int) -> str:
    """The record id of tile `index` (counted over every page: page * tiles per page + tile) of a tiled image."""
    return f"{parent_id}{TILE_SEPARATOR}{index}"


def parent_of(record_id: str) -> str | None:
    """The tiled image a record id belongs to, or None for a plain image."""
    parent, separator, _ = record_id.partition(TILE_SEPARATOR)
    return parent if separator else None
