"""Codecs for what segqueue stores in Redis: compression ratio and CPU per 512x512 image and mask.

    python benchmarks/payloads.py --images 32 --size 512 --rounds 5

Images come from the repo's synthetic microscopy generator (with its shot and read noise), and, as a
second set, the same images with extra camera noise (Gaussian, sigma --extra-noise gray levels),
closer to what real microscopy compresses to. Masks are the generator's exact 0/1 masks.

Image codecs: raw, zstd-1, zstd-3, lz4 (frame, default level), PNG (Pillow, compress_level 6).
Mask codecs: raw, packbits, zstd-1, packbits+zstd-1 (the one broker/payloads.py uses), and
broker/payloads.py's own encode/decode for images (zstd-1 with checksum) and masks, which is what the
worker pays. Ratio = raw bytes / encoded bytes over the whole set; encode and decode ms per image are
the median over --rounds rounds of the per-round mean. Prints a table and writes JSON (date,
machine, versions, command) to benchmarks/results/payloads_<machine>_<timestamp>.json.
lz4 is needed only by this benchmark (segqueue itself depends on zstandard alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lz4.frame  # noqa: E402
import zstandard  # noqa: E402
from PIL import Image  # noqa: E402

from broker import payloads  # noqa: E402
from engines.versions import package_version  # noqa: E402
from toolchain.bench import cpu_model  # noqa: E402
from toolchain.synth import generate  # noqa: E402


def _png_encode(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _png_decode(b: bytes, shape) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def image_codecs() -> dict[str, tuple[Callable, Callable]]:
    z1 = zstandard.ZstdCompressor(level=1)
    z3 = zstandard.ZstdCompressor(level=3)
    zd = zstandard.ZstdDecompressor()
    return {
        "raw": (lambda a: a.tobytes(), lambda b, s: np.frombuffer(b, np.uint8).reshape(s)),
        "zstd-1": (lambda a: z1.compress(a.tobytes()),
                   lambda b, s: np.frombuffer(zd.decompress(b), np.uint8).reshape(s)),
        "zstd-3": (lambda a: z3.compress(a.tobytes()),
                   lambda b, s: np.frombuffer(zd.decompress(b), np.uint8).reshape(s)),
        "lz4": (lambda a: lz4.frame.compress(a.tobytes()),
                lambda b, s: np.frombuffer(lz4.frame.decompress(b), np.uint8).reshape(s)),
        "png": (_png_encode, _png_decode),
        "segqueue (zstd-1 + checksum)": (lambda a: payloads.encode_image(a),
                                         lambda p, s: payloads.decode_image("x", _fields(p))),
    }


def mask_codecs() -> dict[str, tuple[Callable, Callable]]:
    z1 = zstandard.ZstdCompressor(level=1)
    zd = zstandard.ZstdDecompressor()

    def unpack(b: bytes, s) -> np.ndarray:
        return np.unpackbits(np.frombuffer(b, np.uint8), count=s[0] * s[1]).reshape(s)

    return {
        "raw": (lambda a: a.tobytes(), lambda b, s: np.frombuffer(b, np.uint8).reshape(s)),
        "packbits": (lambda a: np.packbits(a, axis=None).tobytes(), unpack),
        "zstd-1": (lambda a: z1.compress(a.tobytes()),
                   lambda b, s: np.frombuffer(zd.decompress(b), np.uint8).reshape(s)),
        "packbits+zstd-1": (lambda a: z1.compress(np.packbits(a, axis=None).tobytes()),
                            lambda b, s: unpack(zd.decompress(b), s)),
        "segqueue (packbits+zstd-1 + checksum)": (lambda a: payloads.encode_mask(a),
                                                  lambda p, s: payloads.decode_mask("x", _fields(p))),
    }


def _fields(payload: payloads.Payload) -> dict[bytes, bytes]:
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in payload.fields().items()}


def _size(encoded) -> int:
    return len(encoded.data) if isinstance(encoded, payloads.Payload) else len(encoded)


def measure(arrays: list[np.ndarray], codecs: dict[str, tuple[Callable, Callable]], rounds: int) -> list[dict]:
    rows = []
    raw_bytes = sum(a.nbytes for a in arrays)
    for name, (encode, decode) in codecs.items():
        enc_ms, dec_ms = [], []
        encoded = []
        for _ in range(rounds):
            start = time.perf_counter()
            encoded = [encode(a) for a in arrays]
            enc_ms.append((time.perf_counter() - start) * 1000 / len(arrays))
            start = time.perf_counter()
            decoded = [decode(e, a.shape) for e, a in zip(encoded, arrays, strict=True)]
            dec_ms.append((time.perf_counter() - start) * 1000 / len(arrays))
        for a, d in zip(arrays, decoded, strict=True):
            assert np.array_equal(a, d), f"{name} did not round-trip"
        stored = sum(_size(e) for e in encoded)
        rows.append({"codec": name, "ratio": round(raw_bytes / stored, 2),
                     "bytes_per_item": round(stored / len(arrays)),
                     "encode_ms": round(statistics.median(enc_ms), 3),
                     "decode_ms": round(statistics.median(dec_ms), 3)})
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'codec':<40}{'ratio':>8}{'bytes/item':>12}{'enc ms':>9}{'dec ms':>9}")
    for r in rows:
        print(f"{r['codec']:<40}{r['ratio']:>8.2f}{r['bytes_per_item']:>12}{r['encode_ms']:>9.3f}{r['decode_ms']:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--extra-noise", type=float, default=3.0, help="sigma (gray levels) of the added camera noise")
    parser.add_argument("--machine", default=None, help="machine label for the file name (default: cpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    pairs = list(generate(args.images, size=args.size, seed=args.seed))
    images = [image for image, _ in pairs]
    masks = [mask for _, mask in pairs]
    rng = np.random.default_rng(args.seed)
    noisy = [np.clip(i.astype(np.float32) + rng.normal(0.0, args.extra_noise, i.shape), 0, 255).round().astype(np.uint8)
             for i in images]

    results = {
        "images_synthetic": measure(images, image_codecs(), args.rounds),
        "images_synthetic_extra_noise": measure(noisy, image_codecs(), args.rounds),
        "masks": measure(masks, mask_codecs(), args.rounds),
    }
    n = f"{args.images} x {args.size}x{args.size} uint8"
    print_table(f"images, synthetic ({n})", results["images_synthetic"])
    print_table(f"images, synthetic + camera noise sigma {args.extra_noise} ({n})",
                results["images_synthetic_extra_noise"])
    print_table(f"masks, 0/1 ({n})", results["masks"])

    stamp = dt.datetime.now(dt.UTC)
    machine = args.machine or "cpu"
    result = {
        "benchmark": "payloads",
        "date": stamp.isoformat(timespec="seconds"),
        "machine": {"host": socket.gethostname(), "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
                    "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "zstandard": zstandard.__version__,
                     "lz4": package_version("lz4"), "pillow": package_version("pillow")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setup": {"images": args.images, "size": args.size, "rounds": args.rounds, "seed": args.seed,
                  "extra_noise_sigma": args.extra_noise,
                  "timing": "ms per item: median over rounds of the per-round mean, one thread"},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"payloads_{machine}_{stamp:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
