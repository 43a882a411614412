"""Images and masks on shared storage, named by location: a path every worker sees, or an fsspec URL.

`producer enqueue SOURCE --by-reference --out DEST` puts locations, not pixels, into Redis; workers
read and decode the images and write the masks themselves, through this module. A location is either
a local path (an NFS or Lustre mount, a Kubernetes ReadWriteMany volume: the same path on every host)
or a URL with a scheme (`s3://bucket/prefix`, `gs://...`, anything fsspec has a backend for; fsspec
and the backend are the optional extra `storage`). Local paths are read and written with the
standard library: fsspec is imported only for URLs.

Reading gives the same pixels and the same per-file problems as the producer's decoder
(common/images.py); a remote object is fetched to a temporary local file and decoded by that same
decoder, so its problems read `<url>: <problem>` as a local file's read `<path>: <problem>`.

Writing is atomic: a local mask is written under a hidden temporary name in its folder
(`.<name>.<random>.tmp`) and renamed over its final name, so a reader sees either no file, the
previous complete file, or the new complete file, never half of one; an object store gets one PUT,
which it applies whole. A process killed mid-write can leave a hidden temporary file behind, never a
partial mask.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from common import png
from common.images import (
    SUPPORTED_SUFFIXES,
    DecodedImage,
    ImageError,
    decode_image,
    find_images,
    read_png_as_is,
    resize_mask,
)

NUM_CLASSES = 2
# fsspec protocols whose writes are single PUTs the store applies whole (no rename needed)
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})
# Mask PNGs: imagecodecs' PNG encoder (libpng) with zlib level 1, run-length strategy, no row filter: masks are
# flat runs of 0 and 255, so this costs a quarter of Pillow's default encoding for a similar size
# (benchmarks/reference_cpu.py); the PNG is the same 8-bit gray image `producer collect` writes.
MASK_PNG_OPTIONS = {"level": 1, "strategy": 3, "filter": 8}  # strategy 3: Z_RLE; filter 8: PNG_FILTER_NONE

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(Exception):
    """A location that cannot be listed, read or written; the message names it and says why."""


def is_url(location: str) -> bool:
    """Whether `location` is an fsspec URL (`scheme://...`) rather than a local path (`file://` counts as a path)."""
    return bool(_SCHEME.match(location)) and not location.startswith("file://")


def normalize(location: str) -> str:
    """A location as stored in jobs: a URL without its trailing slash, or a local path made absolute."""
    if is_url(location):
        return location.rstrip("/")
    if location.startswith("file://"):
        location = location[len("file://"):]
    return str(Path(location).expanduser().resolve())


def join(root: str, name: str) -> str:
    """The location of relative POSIX `name` under `root` (a normalized location)."""
    return f"{root}/{name}"


def mask_name(name: str) -> str:
    """Relative name of an image's mask: the image's with `.png` (as `producer collect` names it).

    Raises ValueError for a name that is absolute, climbs out with `..`, or has no file name.
    """
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise ValueError(f"refusing to write a mask outside the output location: {name}")
    return str(path.with_suffix(".png"))


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; StorageError if fsspec or the backend is missing."""
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{url}: URLs need fsspec: pip install 'segqueue[storage]' (and the backend, e.g. "
                           "s3fs or gcsfs)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: no fsspec backend for it ({exc})") from None


# --- listing ---------------------------------------------------------------------------------


def list_images(source: str) -> tuple[list[tuple[str, str]], list[ImageError]]:
    """The images under `source` (a folder or a URL prefix): ((location, relative name), ...) sorted by name,
    and every entry not taken, worded as the producer words it (`<location>: <problem>`).

    Local folders are searched exactly as `producer enqueue` searches them (common.images.find_images):
    hidden entries skipped, other suffixes and broken links reported. Under a URL, objects whose
    relative name has a hidden part are skipped and other suffixes reported.
    """
    if not is_url(source):
        found, local_problems = find_images([Path(source)])
        return [(str(item.path), item.name) for item in found], local_problems
    fs, root = _filesystem(source)
    try:
        paths = fs.find(root, detail=False)
    except OSError as exc:
        raise StorageError(f"{source}: cannot list it: {exc}") from None
    protocol = source.split("://", 1)[0]
    found_urls: list[tuple[str, str]] = []
    problems: list[ImageError] = []
    for path in sorted(paths):
        name = path[len(root):].lstrip("/") if path.startswith(root) else path
        if not name or any(part.startswith(".") for part in name.split("/")):
            continue
        url = f"{protocol}://{path}"
        if PurePosixPath(name).suffix.lower() not in SUPPORTED_SUFFIXES:
            suffix = PurePosixPath(name).suffix
            shown = f"'{suffix}'" if suffix else "(no suffix)"
            problems.append(location_error(url, f"unsupported file type {shown} (supported: "
                                                f"{', '.join(sorted(SUPPORTED_SUFFIXES))})"))
            continue
        found_urls.append((url, name))
    if not found_urls:
        problems.append(location_error(source, "no supported images under it (looked for "
                                               f"{', '.join(sorted(SUPPORTED_SUFFIXES))})"))
    return found_urls, problems


# --- reading ---------------------------------------------------------------------------------


def read_image(location: str, height: int, width: int) -> DecodedImage:
    """Read and decode one image at height x width, as the producer's decoder does (common.images.decode_image).

    Raises ImageError naming the location and the problem: missing, empty, truncated, unreadable,
    unsupported, too large, a multi-page TIFF (stacks are not read by reference), ...

    A PNG that already is the engine input (8-bit gray at height x width, one frame, no orientation,
    every chunk's CRC intact: common.images.read_png_as_is) is inflated by imagecodecs, which gives
    the same pixels as the decoder's Pillow path at less CPU; any other file goes through decode_image.
    """
    if not is_url(location):
        as_is = read_png_as_is(Path(location), height, width)
        if as_is is not None:
            return _engine_input_png(as_is, height, width)
        try:
            return decode_image(Path(location), height, width)
        except ImageError as exc:
            raise location_error(location, _by_reference_problem(exc.problem)) from None
    fs, path = _filesystem(location)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise location_error(location, "no such file or directory") from None
    except (OSError, ValueError) as exc:  # permissions, network, the backend's own errors
        raise location_error(location, f"cannot read file: {exc}") from None
    try:
        png.check_engine_input(data, height, width)
        return _engine_input_png(data, height, width)
    except png.PngStructureError:
        pass  # anything else: the decoder's own rules and messages, from a local copy
    suffix = PurePosixPath(path).suffix
    with tempfile.NamedTemporaryFile(suffix=suffix, dir=_scratch_dir()) as scratch:
        scratch.write(data)
        scratch.flush()
        try:
            return decode_image(Path(scratch.name), height, width)
        except ImageError as exc:
            raise location_error(location, _by_reference_problem(exc.problem)) from None


def _by_reference_problem(problem: str) -> str:
    """The decoder's problem, with what to do instead for a stack: by reference a file is one image, resized to the
    engine input; `producer enqueue` without --by-reference segments a stack page by page (producer/tiling.py)."""
    if problem.startswith("multi-page TIFF"):
        return (f"{problem.split(':', 1)[0]}: by reference a file is one image; enqueue stacks without --by-reference "
                "(they are then segmented page by page)")
    return problem


def _engine_input_png(data: bytes, height: int, width: int) -> DecodedImage:
    """The pixels of a PNG file checked to be the engine input as is (uint8 (height, width))."""
    import imagecodecs  # here: 0.07 s to import, which every command importing the store would pay

    pixels = imagecodecs.png_decode(data)
    if pixels.shape != (height, width) or pixels.dtype != np.uint8:  # the check above makes this unreachable
        raise ValueError(f"PNG decoded to {pixels.dtype} {pixels.shape}, expected uint8 ({height}, {width})")
    return DecodedImage(np.ascontiguousarray(pixels), height, width)


def location_error(location: str, problem: str) -> ImageError:
    """An ImageError whose text is `<location>: <problem>`, also for a URL (a Path would fold its `//`)."""
    error = ImageError(Path(location), problem)
    error.args = (f"{location}: {error.problem}",)
    return error


def _scratch_dir() -> str | None:
    """Where fetched objects are decoded from: memory-backed /dev/shm where there is one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# --- writing ---------------------------------------------------------------------------------


def mask_png(mask: np.ndarray, height: int, width: int, classes: int = NUM_CLASSES) -> bytes:
    """A mask of class ids (uint8 (h, w)) as the PNG `producer collect` writes: resized (nearest) to
    height x width, class c as gray c * 255 // (classes - 1)."""
    resized = resize_mask(mask, height, width)
    gray = (resized.astype(np.uint16) * (255 // max(1, classes - 1))).astype(np.uint8)
    import imagecodecs  # here: see _engine_input_png

    return bytes(imagecodecs.png_encode(gray, **MASK_PNG_OPTIONS))


def write_atomically(location: str, data: bytes) -> None:
    """Write `data` at `location` whole or not at all; StorageError names the location and the problem.

    Local: a hidden temporary file in the same folder, renamed over the final name (os.replace).
    Object stores: one PUT. Other fsspec filesystems: a temporary name, then a move.
    """
    if not is_url(location):
        _write_local(Path(location), data)
        return
    fs, path = _filesystem(location)
    try:
        if fs.protocol in OBJECT_STORES or (isinstance(fs.protocol, tuple) and OBJECT_STORES & set(fs.protocol)):
            fs.pipe_file(path, data)
            return
        parent = path.rsplit("/", 1)[0]
        temporary = f"{parent}/.{PurePosixPath(path).name}.{uuid.uuid4().hex[:12]}.tmp"
        fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot write {location}: {exc}") from None


def _write_local(path: Path, data: bytes) -> None:
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except (OSError, ValueError) as exc:  # a file in the way, a full disk, a NUL in the name, ...
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise StorageError(f"cannot write {path}: {exc}") from None
