"""PNG files that already are the engine input, stored in a real redis-server: `store_files` keeps them as they
are (codec `png`) beside a file it re-encodes (codec `zstd1`), and the worker side loads the same pixels.
Which files qualify and how damaged records fail: tests/unit/test_png_as_is.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from broker.store import QueueStore
from common.images import ImageSource
from common.images import decode_image as decode_file
from producer.pool import store_files
from producer.tiling import RESIZE
from tests.unit.test_png_as_is import SIZE, _other_size, microscopy, save_png


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
