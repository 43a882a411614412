"""PNG files that already are the engine input, stored in a real redis-server: `store_files` keeps them as they
are (codec `png`) beside a file it re-encodes (codec `zstd1`), and the worker side loads the same pixels; every
other PNG is decoded once (not once more to learn its oriented size), tiled or not.
Which files qualify and how damaged records fail: tests/unit/test_png_as_is.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from broker.store import QueueStore
from broker.tiled import TiledImage
from common.images import ImageSource
from common.images import decode_image as decode_file
from common.pages import read_pages
from common.tiles import cut_tiles
from producer.pool import store_files
from producer.tiling import RESIZE, TILE
from tests.unit.test_png_as_is import SIZE, _other_size, _rgb, microscopy, save_png
from tests.unit.test_tiles import _counting_png_loads, _quarter_turned_png


def test_store_files_stores_both_codecs_and_the_worker_side_reads_them(tmp_path, client, queue_name):
    as_is = save_png(tmp_path / "as_is.png", Image.fromarray(microscopy(seed=3)))
    other = _other_size(tmp_path)
    store = QueueStore(client, queue_name)
    chunk_ = store_files(store, [ImageSource(as_is, "as_is.png"), ImageSource(other, "big.png")], SIZE, SIZE,
                         RESIZE)  # the other size resized, as the study does (tiling: test_tiling.py)
    assert not chunk_.rejected and len(chunk_.stored) == 2
    ids = {name: image_id for image_id, name in chunk_.stored}
    codecs = {name: client.hget(f"segq:{queue_name}:img:{image_id}", "codec") for name, image_id in ids.items()}
    assert codecs == {"as_is.png": b"png", "big.png": b"zstd1"}
    loaded = store.load_images([ids["as_is.png"], ids["big.png"]])
    np.testing.assert_array_equal(loaded[0].pixels, microscopy(seed=3))
    np.testing.assert_array_equal(loaded[1].pixels, decode_file(other, SIZE, SIZE).pixels)
    assert (loaded[1].original_height, loaded[1].original_width) == (SIZE * 2, SIZE * 2)


def test_store_files_decodes_every_other_png_once_tiled_or_not(tmp_path, client, queue_name, monkeypatch):
    rgb = _rgb(tmp_path)  # the engine's size, but not its input as it is: decoded and re-encoded
    turned = _quarter_turned_png(tmp_path / "turned.png", height=SIZE + 20, width=2 * SIZE)  # tiled as displayed
    expected_turned = next(read_pages(turned))
    loads = _counting_png_loads(monkeypatch)
    store = QueueStore(client, queue_name)
    chunk_ = store_files(store, [ImageSource(rgb, "rgb.png"), ImageSource(turned, "turned.png")], SIZE, SIZE, TILE)
    assert not chunk_.rejected and sorted(loads) == sorted([str(rgb), str(turned)])  # each file decoded once
    first, *tiles = chunk_.stored
    assert first[1] == "rgb.png"
    np.testing.assert_array_equal(store.load_images([first[0]])[0].pixels, decode_file(rgb, SIZE, SIZE).pixels)
    unit = chunk_.units[1]
    (raw,) = store.load_tiled([unit.unit_id])
    assert raw is not None
    parent = TiledImage.from_json(unit.unit_id, raw)
    assert (parent.height, parent.width, parent.pages) == (2 * SIZE, SIZE + 20, 1)  # the displayed size
    expected_tiles = list(cut_tiles(expected_turned, parent.layout))
    assert unit.records == len(tiles) == len(expected_tiles) == parent.records
    for stored, expected in zip(store.load_images([record for record, _ in tiles]), expected_tiles, strict=True):
        np.testing.assert_array_equal(stored.pixels, expected)
