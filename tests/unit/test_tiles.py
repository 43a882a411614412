"""Tiling without Redis or an engine: the tile grid, cutting with reflect padding, stitching, the tiled record,
reading stacks page by page, and record counts (common/tiles.py, common/pages.py, broker/tiled.py,
producer/tiling.py). The pipeline through Redis and a real engine: tests/integration/test_tiling.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image, PngImagePlugin

from broker.payloads import PayloadError
from broker.tiled import TiledImage
from common.images import ImageError
from common.pages import PageShape, probe_or_read, probe_pages, read_pages
from common.tiles import axis_origins, cut_tiles, parent_of, plan_tiles, stitch, tile_id
from producer.tiling import RESIZE, TILE, Fitting, file_records, record_count


def _reference_owner(length: int, origins: list[int], tile: int) -> np.ndarray:
    """Per pixel, the tile it is furthest inside of (distance to the nearer of its two edges), written
    without common/tiles.py: a loop over pixels and tiles, the first tile kept on a tie."""
    owner = np.empty(length, dtype=np.int64)
    for pixel in range(length):
        best, best_depth = -1, -1
        for index, origin in enumerate(origins):
            if origin <= pixel < origin + tile:
                depth = min(pixel - origin, origin + tile - 1 - pixel)
                if depth > best_depth:
                    best, best_depth = index, depth
        owner[pixel] = best
    return owner


@pytest.mark.parametrize(("length", "tile", "overlap"), [(2048, 512, 64), (1536, 512, 64), (600, 512, 64),
                                                         (64, 64, 16), (150, 64, 16), (65, 64, 0)])
def test_tiles_cover_every_pixel_with_at_least_the_overlap(length, tile, overlap):
    origins = axis_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] + tile == length
    assert all(b > a and a + tile - b >= overlap for a, b in zip(origins, origins[1:], strict=False))


def test_the_2048x1536_grid():
    layout = plan_tiles(1536, 2048, 512, 512, 64)
    assert layout.rows == [0, 448, 896, 1024] and layout.columns == [0, 448, 896, 1344, 1536]
    assert layout.count == 20 and layout.origin(6) == (448, 448)


def test_stitching_equals_a_per_pixel_reference():
    """Every tile gets its own distinct constant mask, so the stitched page says which tile each pixel came from."""
    height, width, tile, overlap = 150, 200, 64, 16
    layout = plan_tiles(height, width, tile, tile, overlap)
    masks = [np.full((tile, tile), index, np.uint8) for index in range(layout.count)]
    stitched = stitch(masks, layout)
    rows = _reference_owner(height, layout.rows, tile)
    columns = _reference_owner(width, layout.columns, tile)
    expected = rows[:, None] * len(layout.columns) + columns[None, :]
    assert np.array_equal(stitched, expected)
    assert len(np.unique(stitched)) == layout.count  # every tile contributes


def test_stitching_real_content_gives_back_the_page():
    """Masks that are the tiles themselves (each pixel its own value) stitch back to the page, padding cut off."""
    rng = np.random.default_rng(3)
    for height, width in [(150, 200), (40, 90), (64, 64), (30, 20), (1, 70)]:
        page = rng.integers(0, 256, (height, width), dtype=np.uint8)
        layout = plan_tiles(height, width, 64, 64, 16)
        tiles = list(cut_tiles(page, layout))
        assert all(t.shape == (64, 64) and t.flags.c_contiguous for t in tiles)
        assert np.array_equal(stitch(tiles, layout), page)


def test_a_page_of_exactly_the_tile_size_is_one_unchanged_tile():
    page = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    layout = plan_tiles(64, 64, 64, 64, 16)
    (tile,) = cut_tiles(page, layout)
    assert layout.count == 1 and np.array_equal(tile, page)
    assert np.array_equal(stitch([tile], layout), page)


def test_a_small_page_is_padded_by_reflection_not_stretched():
    page = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20).astype(np.uint8)
    (tile,) = cut_tiles(page, plan_tiles(30, 20, 64, 64, 16))
    assert np.array_equal(tile[:30, :20], page)
    assert np.array_equal(tile[30:32, :20], page[28:26:-1])  # reflected about the last row
    assert np.array_equal(tile[:30, 20:22], page[:, 18:16:-1])


def test_stitch_refuses_the_wrong_number_or_size_of_masks():
    layout = plan_tiles(150, 200, 64, 64, 16)
    with pytest.raises(ValueError, match="tile masks"):
        stitch([np.zeros((64, 64), np.uint8)] * (layout.count - 1), layout)
    with pytest.raises(ValueError, match="mask is"):
        stitch([np.zeros((32, 64), np.uint8)] * layout.count, layout)
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(150, 200, 64, 64, 64)


def test_tile_ids_name_their_parent():
    assert parent_of(tile_id("ab12", 7)) == "ab12" and tile_id("ab12", 7) == "ab12.7"
    assert parent_of("ab12") is None


def _record(**changes) -> TiledImage:
    fields = dict(parent_id="p1", name="a/stack.tif", height=150, width=200, pages=5, fit="tile", tile_h=64,
                  tile_w=64, overlap=16, enqueued_at=1.5)
    return TiledImage(**{**fields, **changes})


def test_the_tiled_record_round_trips_and_says_where_a_tile_is():
    image = _record()
    again = TiledImage.from_json("p1", image.to_json().encode())
    assert again == image and image.records == 5 * 12
    assert image.record_ids(page=1) == [f"p1.{i}" for i in range(12, 24)]
    assert image.where(13) == "page 2 of 5, tile 2 of 12"
    assert _record(pages=1).where(3) == "tile 4 of 12"
    resized = _record(fit="resize")
    assert resized.records == 5 and resized.where(2) == "page 3 of 5"


@pytest.mark.parametrize("raw", [b"not json", b"[]", json.dumps({"format": "other"}).encode(),
                                 _record(height=0).to_json().encode(), _record(fit="stretch").to_json().encode(),
                                 _record(overlap=64).to_json().encode()])
def test_a_malformed_tiled_record_is_named(raw):
    with pytest.raises(PayloadError, match="tiled image p1 is malformed"):
        TiledImage.from_json("p1", raw)


def _stack(path, pages, height=40, width=30):
    data = (np.arange(pages * height * width) % 251).astype(np.uint8).reshape(pages, height, width)
    tifffile.imwrite(path, data, photometric="minisblack", metadata=None)
    return data


def test_a_stack_is_read_page_by_page_in_order(tmp_path):
    data = _stack(tmp_path / "s.tif", 5)
    assert probe_pages(tmp_path / "s.tif") == PageShape(5, 40, 30)
    pages = list(read_pages(tmp_path / "s.tif"))
    assert len(pages) == 5 and all(np.array_equal(p, d) for p, d in zip(pages, data, strict=True))


def test_a_stack_over_the_page_limit_or_with_pages_of_two_sizes_is_refused_before_decoding(tmp_path):
    _stack(tmp_path / "s.tif", 4)
    with pytest.raises(ImageError, match="4 pages: the limit is 3 pages per file"):
        probe_pages(tmp_path / "s.tif", max_pages=3)
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tiff:
        tiff.write(np.zeros((40, 30), np.uint8), photometric="minisblack", metadata=None)
        tiff.write(np.zeros((41, 30), np.uint8), photometric="minisblack", metadata=None)
    with pytest.raises(ImageError, match=r"mixed\.tif: page 2 of 2: size 30x41 differs from page 1's 30x40"):
        next(read_pages(tmp_path / "mixed.tif"))


def test_the_pixel_limit_applies_per_page(tmp_path):
    _stack(tmp_path / "s.tif", 3)
    assert probe_pages(tmp_path / "s.tif", max_pixels=40 * 30).pages == 3  # 3 pages of 1,200 px each pass
    with pytest.raises(ImageError, match="image too large"):
        probe_pages(tmp_path / "s.tif", max_pixels=40 * 30 - 1)


def test_record_counts(tmp_path):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "exact.png")
    exact = probe_pages(tmp_path / "exact.png")
    assert record_count(exact, 64, 64, TILE) == 1 and record_count(exact, 64, 64, RESIZE) == 1
    _stack(tmp_path / "s.tif", 5, height=150, width=200)
    stack = probe_pages(tmp_path / "s.tif")
    assert record_count(stack, 64, 64, Fitting(overlap=16)) == 5 * 12
    assert record_count(stack, 64, 64, RESIZE) == 5
    assert Fitting().for_engine(64, 64).overlap == 16 and Fitting().for_engine(512, 512).overlap == 64
    with pytest.raises(ValueError, match="less than half"):
        Fitting(overlap=32).for_engine(64, 64)


def _quarter_turned_png(path, height=150, width=200):
    """A gray PNG stored height x width whose EXIF orientation (6) turns it a quarter: displayed width x height."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray((np.arange(height * width) % 253).astype(np.uint8).reshape(height, width)).save(path, exif=exif)
    return path


def _counting_png_loads(monkeypatch) -> list[str]:
    """Spy on Pillow's PNG pixel decoding (PngImageFile.load, which still runs): the file of each load that decodes
    pixels (its image data not read yet; a later load() of a loaded image decodes nothing)."""
    calls: list[str] = []
    original = PngImagePlugin.PngImageFile.load

    def load(self):
        if self.tile:
            calls.append(str(self.filename))
        return original(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    return calls


def test_a_record_count_reads_a_png_header_without_decoding_its_pixels(tmp_path, monkeypatch):
    """Pillow finds a PNG's EXIF only by decoding its pixels: a square engine's count needs no orientation."""
    Image.fromarray(np.zeros((700, 1000), np.uint8)).save(tmp_path / "plain.png")  # no EXIF at all
    _quarter_turned_png(tmp_path / "turned.png")
    loads = _counting_png_loads(monkeypatch)
    tile = TILE.for_engine(512, 512)
    assert file_records(tmp_path / "plain.png", 512, 512, tile) == 2 * 3
    assert file_records(tmp_path / "plain.png", 512, 512, RESIZE) == 1
    assert file_records(tmp_path / "turned.png", 64, 64, Fitting(overlap=16)) == 3 * 4  # either way round
    assert loads == []
    assert probe_pages(tmp_path / "plain.png", oriented=False) == PageShape(1, 700, 1000) and loads == []


def test_a_quarter_turned_png_is_probed_turned_and_counted_turned_for_a_non_square_engine(tmp_path):
    path = _quarter_turned_png(tmp_path / "turned.png")
    assert probe_pages(path) == PageShape(1, 200, 150)  # as displayed
    assert probe_pages(path, oriented=False) == PageShape(1, 150, 200)  # as stored
    fitting = Fitting().for_engine(64, 48)  # overlap 12: 4 x 4 tiles displayed, 3 x 6 as stored
    assert file_records(path, 64, 48, fitting) == record_count(PageShape(1, 200, 150), 64, 48, fitting) == 16
    assert record_count(PageShape(1, 150, 200), 64, 48, fitting) == 18


def test_probe_or_read_decodes_a_png_once_and_reads_only_a_tiffs_headers(tmp_path, monkeypatch):
    path = _quarter_turned_png(tmp_path / "turned.png")
    expected = next(read_pages(path))
    loads = _counting_png_loads(monkeypatch)
    shape, page = probe_or_read(path)
    assert shape == PageShape(1, 200, 150) and page is not None and np.array_equal(page, expected)
    assert loads == [str(path)]
    _stack(tmp_path / "s.tif", 3)
    assert probe_or_read(tmp_path / "s.tif") == (PageShape(3, 40, 30), None)
    with pytest.raises(ImageError, match="4 pages: the limit is 3"):
        _stack(tmp_path / "s4.tif", 4)
        probe_or_read(tmp_path / "s4.tif", max_pages=3)
