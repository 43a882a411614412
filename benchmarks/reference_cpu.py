"""Worker CPU per image by reference: read + decode an image file, and encode + write its mask, one core.

    python benchmarks/reference_cpu.py --images 64 --size 512

What the worker's decode processes run per image in `--by-reference` mode (common/storage.py,
worker/mask_files.py), on `engines synth` PNGs (8-bit gray at the engine's size, as files on a
local disk; the page cache is warm after the first pass, so this is CPU, not disk). Each candidate
is timed with process CPU time (time.process_time) over every image, best of --repeats passes:

- read + decode: the producer's decoder (common.images.decode_image: Pillow), Pillow alone, and
  what the worker uses (storage.read_image: the engine-input check, then imagecodecs' inflate);
  every candidate's pixels are checked to be identical to decode_image's.
- mask: encode as PNG (Pillow at its default level 6 as `producer collect` writes, Pillow level 1,
  and what the worker uses: imagecodecs/libpng level 1, RLE, no filter) with the decoded pixels
  checked equal; then the worker's whole write (storage.mask_png + the atomic write).

Prints a table and the cores one GPU needs at --gpu-img-s (default 1,450: the INT8 engine's rate)
= rate x (read + decode + mask write) CPU per image; writes benchmarks/results/reference_cpu_<ts>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402
from common import storage  # noqa: E402
from common.images import decode_image  # noqa: E402
from worker.mask_files import MaskFile, write_mask_files  # noqa: E402


def cpu_ms_per_item(work: Callable[[Any], object], items: list[Any], repeats: int) -> float:
    """Best, over `repeats` passes, of this process's CPU milliseconds per item."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for item in items:
            work(item)
        best = min(best, (time.process_time() - started) * 1000 / len(items))
    return round(best, 3)


def pillow_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image)


def pillow_encode(level: int) -> Callable[[np.ndarray], bytes]:
    def encode(gray: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()
    return encode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-img-s", type=float, default=1450.0, help="images a second one GPU consumes")
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args()
    from toolchain.synth import generate

    folder = Path(tempfile.mkdtemp(prefix="reference_cpu_"))
    paths, masks = [], []
    for index, (image, mask) in enumerate(generate(args.images, size=args.size, seed=0)):
        path = folder / "in" / f"img_{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
        masks.append(mask.astype(np.uint8))
    size = args.size
    reference = [decode_image(p, size, size).pixels for p in paths]
    decoders: dict[str, Callable[[Path], np.ndarray]] = {
        "decode_image (producer's decoder, Pillow)": lambda p: decode_image(p, size, size).pixels,
        "Pillow PNG alone": lambda p: pillow_png(p.read_bytes()),
        "storage.read_image (worker: check + imagecodecs)": lambda p: storage.read_image(str(p), size, size).pixels,
    }
    decode_rows = []
    for name, decode in decoders.items():
        same = all(np.array_equal(decode(p), want) for p, want in zip(paths, reference, strict=True))
        decode_rows.append({"decoder": name, "ms_per_image": cpu_ms_per_item(decode, paths, args.repeats),
                            "same_pixels": same})
    grays = [m * 255 for m in masks]
    encoders: dict[str, Callable[[np.ndarray], bytes]] = {
        "Pillow level 6 (producer collect)": pillow_encode(6),
        "Pillow level 1": pillow_encode(1),
        "imagecodecs level 1, RLE, no filter (worker)": lambda g: bytes(storage.mask_png(g // 255, size, size)),
    }
    encode_rows = []
    for name, encode in encoders.items():
        same = all(np.array_equal(pillow_png(encode(g)), g) for g in grays)
        encode_rows.append({"encoder": name, "ms_per_mask": cpu_ms_per_item(encode, grays, args.repeats),
                            "bytes_per_mask": round(sum(len(encode(g)) for g in grays) / len(grays)),
                            "same_pixels": same})
    files = [MaskFile("i", str(folder / "out" / f"m_{i:04d}.png"), np.packbits(m).tobytes(), True, m.shape,
                      m.shape) for i, m in enumerate(masks)]
    write_ms = cpu_ms_per_item(lambda f: write_mask_files([f]), files, args.repeats)
    read_ms = decode_rows[-1]["ms_per_image"]
    per_image = read_ms + write_ms
    result = {
        "benchmark": "reference_cpu",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{socket.gethostname()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "cpu_model": cpu_model(),
        "images": args.images,
        "size": size,
        "decode": decode_rows,
        "mask_encode": encode_rows,
        "worker_read_decode_ms_per_image": read_ms,
        "worker_mask_write_ms_per_image": write_ms,
        "worker_ms_per_image": round(per_image, 3),
        "gpu_img_s": args.gpu_img_s,
        "cores_per_gpu": round(args.gpu_img_s * per_image / 1000, 2),
        "versions": {**{d: _version(d) for d in ("numpy", "pillow", "imagecodecs")},
                     "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    path = args.out_json or ROOT / "benchmarks" / "results" / f"reference_cpu_{dt.datetime.now():%Y%m%dT%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"worker CPU per {size}x{size} image by reference, one core ({result['cpu_model']}), {args.images} images")
    for row in decode_rows:
        print(f"  read + decode  {row['decoder']:<52}{row['ms_per_image']:>8.3f} ms  same pixels: {row['same_pixels']}")
    for row in encode_rows:
        print(f"  mask encode    {row['encoder']:<52}{row['ms_per_mask']:>8.3f} ms  {row['bytes_per_mask']:>6} B  "
              f"same pixels: {row['same_pixels']}")
    print(f"  mask write (encode + atomic write, worker){'':<24}{write_ms:>8.3f} ms")
    print(f"worker total {per_image:.3f} ms per image: one GPU at {args.gpu_img_s:.0f} img/s needs "
          f"{result['cores_per_gpu']:.2f} cores of this kind")
    print(f"wrote {path}")
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    sys.exit(main())
