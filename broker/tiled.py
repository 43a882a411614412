"""The record of a tiled image or stack: how its pages were cut into engine inputs, so collect can put them back.

An image larger or smaller than the engine input (`--fit tile`), and every page of a multi-page
TIFF, is stored as several ordinary image records ("tiles", broker/store.py), one per engine input,
with record ids `<parent id>.<index>` (common/tiles.py: `tile_id`); index = page * tiles per page +
tile. The worker processes them like any image. This record, one JSON value per tiled image in the
queue's `tiled` hash (never pickle), says how to stitch their masks back: the original page size,
the page count, the tile grid, and whether the pages were tiled or resized (`--fit resize` with a
stack: one record per page, resized).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from broker.payloads import PayloadError
from common.tiles import TileLayout, plan_tiles, tile_id

TILED_FORMAT = "segq-tiled/1"
FIT_TILE = "tile"
FIT_RESIZE = "resize"


@dataclass(frozen=True)
class TiledImage:
    """One user image (or stack) stored as `records` engine inputs.

    height, width: one page's original size (px). pages: page count. fit: "tile" (engine-sized tiles of
    each page, `overlap` px shared) or "resize" (each page resized to the engine input, one record per
    page). tile_h, tile_w: the engine input size. enqueued_at: unix s when its first tile was stored.
    """

    parent_id: str
    name: str
    height: int
    width: int
    pages: int
    fit: str
    tile_h: int
    tile_w: int
    overlap: int
    enqueued_at: float

    @property
    def layout(self) -> TileLayout:
        """How each page is cut (fit "tile"; for "resize", one tile of the page's size)."""
        if self.fit == FIT_RESIZE:
            return TileLayout(self.height, self.width, self.height, self.width, 0)
        return plan_tiles(self.height, self.width, self.tile_h, self.tile_w, self.overlap)

    @property
    def tiles_per_page(self) -> int:
        return 1 if self.fit == FIT_RESIZE else self.layout.count

    @property
    def records(self) -> int:
        """Engine inputs stored for this image: pages x tiles per page."""
        return self.pages * self.tiles_per_page

    def record_ids(self, page: int | None = None) -> list[str]:
        """The record ids of every tile, or of one page's (page counted from 0)."""
        per_page = self.tiles_per_page
        indices = range(self.records) if page is None else range(page * per_page, (page + 1) * per_page)
        return [tile_id(self.parent_id, index) for index in indices]

    def where(self, index: int) -> str:
        """Tile `index` in words: "page 2 of 5, tile 3 of 20" (counted from 1; no page for a single image)."""
        per_page = self.tiles_per_page
        page, tile = divmod(index, per_page)
        parts = [f"page {page + 1} of {self.pages}"] if self.pages > 1 else []
        if per_page > 1:
            parts.append(f"tile {tile + 1} of {per_page}")
        return ", ".join(parts) or "its only tile"

    def to_json(self) -> str:
        """The JSON value stored in the queue's `tiled` hash."""
        fields = asdict(self)
        del fields["parent_id"]
        return json.dumps({"format": TILED_FORMAT, **fields}, sort_keys=True)

    @classmethod
    def from_json(cls, parent_id: str, raw: bytes) -> TiledImage:
        """Read a `tiled` hash value back; PayloadError naming the image if it is not what to_json writes."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.pop("format", None) != TILED_FORMAT:
                raise ValueError(f"not a {TILED_FORMAT} record")
            image = cls(parent_id=parent_id, **data)
            checks = [isinstance(image.name, str), image.fit in (FIT_TILE, FIT_RESIZE),
                      *(isinstance(value, int) and value > 0 for value in
                        (image.height, image.width, image.pages, image.tile_h, image.tile_w)),
                      isinstance(image.overlap, int), isinstance(image.enqueued_at, (int, float))]
            if not all(checks):
                raise ValueError("a field has the wrong type or value")
            image.layout  # noqa: B018  # a grid that cannot be planned is the record's problem
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise PayloadError(f"tiled image {parent_id} is malformed in Redis: {exc}") from None
        return image
