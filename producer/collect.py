"""Collect stage: masks back from Redis as PNG files at each image's original size, under its relative name.

Tiled images are stitched back and stacks written as multi-page TIFFs (`a/stack.tif` -> `OUT/a/stack.tif`) by
producer/collect_tiled.py.

Images enqueued by reference (`producer enqueue --by-reference --out DEST`, broker/references.py) have
no mask in Redis: the worker wrote it to its mask URL under DEST before marking the image done. Collect
counts such an image as done where its mask already is (`in_place`), and does not copy it to OUT; a
local mask is checked to exist (a URL is not: that would be one request per image). With `delete`, a
by-reference image is freed once collect has reported its outcome, done or failed: its record only
points at a file the user has, so a failed one is retried by enqueueing that file again.

A mask of class ids c (0..classes-1) is written as 8-bit gray c * 255 // (classes - 1): for the
2-class U-Net, background 0 and foreground 255. `a/b/cell.tif` becomes `OUT/a/b/cell.png`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from broker.store import QueueStore, StoredMask
from broker.tiled import TiledImage
from common import storage
from common.images import MAX_PIXELS, resize_mask
from common.tiles import parent_of
from producer.collect_tiled import TileProblem, load_tiled_images, tiled_outcome, write_tiled

NUM_CLASSES = 2


@dataclass
class CollectReport:
    """What a collect run wrote, what failed (name -> reason), what has no mask yet (names), and the mask
    locations of images enqueued by reference that are done (written there by the worker, not copied)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    in_place: dict[str, str] = field(default_factory=dict)  # name -> mask URL


class MaskNotWritten(Exception):
    """One image's mask file cannot be written; the message says why. Collect lists it and goes on."""


def mask_path(out_dir: Path, name: str) -> Path:
    """Where the mask of the image named `name` (a relative POSIX path) is written.

    Raises ValueError for a name that is absolute, climbs out with `..`, or has no file name.
    """
    relative = Path(*Path(name).parts).with_suffix(".png")
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"refusing to write outside {out_dir}: {name}")
    return out_dir / relative


def write_mask(out_dir: Path, name: str, mask: np.ndarray, original_size: tuple[int, int]) -> Path:
    """Write one mask as a PNG at its original size under `out_dir`; MaskNotWritten says why not."""
    try:
        path = mask_path(out_dir, name)
    except ValueError as exc:  # absolute, `..`, or no file name at all
        raise MaskNotWritten(str(exc)) from None
    height, width = original_size
    if height * width > MAX_PIXELS:
        raise MaskNotWritten(f"its stored original size {height}x{width} is over the {MAX_PIXELS}-pixel limit "
                             "that enqueue enforces: the record is malformed")
    try:
        pixels = mask_to_png_values(resize_mask(mask, height, width))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    except (OSError, ValueError) as exc:  # a file in the way, a full disk, a NUL in the name, ...
        raise MaskNotWritten(f"cannot write {path}: {exc}") from None
    return path


def mask_to_png_values(mask: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """Class ids (uint8 (H, W)) -> visible gray levels: c * 255 // (classes - 1)."""
    return (mask.astype(np.uint16) * (255 // max(1, classes - 1))).astype(np.uint8)


ROUND_TRIP_IMAGES = 64  # masks read (and forgotten) per Redis round trip


def collect_units(image_ids: list[str]) -> list[str]:
    """What collect writes one file for, in first-seen order: each plain image id, and for tile ids (a tiled image's
    records, as the manifest lists them) their tiled image's id, once."""
    return list(dict.fromkeys(parent_of(i) or i for i in image_ids))


def collect_masks(
    store: QueueStore,
    out_dir: Path,
    image_ids: list[str] | None = None,
    on_progress: Callable[[], None] = lambda: None,
    delete: bool = False,
) -> CollectReport:
    """Write a PNG for every image (or every one of `image_ids`: image ids, tiled image ids or tile ids) that has a
    mask, and a stitched PNG or multi-page TIFF for every tiled image whose tiles all have one; report the rest.

    Masks are read ROUND_TRIP_IMAGES at a time. A mask that cannot be read (stored by an older
    segqueue version, or corrupt), a malformed image record (original size not positive integers)
    or a name that would be written outside `out_dir` is reported as failed with the reason, and
    collect goes on with the other images.
    delete: once a mask file is written, delete the image and its mask from Redis (failed and
    unfinished images stay), so that a long-running queue does not grow without bound.
    """
    if image_ids is None:
        names = store.manifest()
        wanted = [i for i in names if parent_of(i) is None]
        parents = list(dict.fromkeys(p for i in names if (p := parent_of(i)) is not None))
        tiled = load_tiled_images(store, parents)
    else:
        image_ids = collect_units(image_ids)
        names = store.names(image_ids)
        tiled = load_tiled_images(store, image_ids)
        wanted, parents = [i for i in image_ids if i not in tiled], [i for i in image_ids if i in tiled]
    failures = store.failures()
    report = CollectReport()
    for parent_id in parents:
        if _collect_tiled(store, report, out_dir, parent_id, tiled.get(parent_id), failures) and delete:
            image = tiled[parent_id]
            assert isinstance(image, TiledImage)
            store.forget(image.record_ids(), tiled=[parent_id])
        on_progress()
    for start in range(0, len(wanted), ROUND_TRIP_IMAGES):
        chunk = wanted[start:start + ROUND_TRIP_IMAGES]
        written_ids, referenced_ids = [], []
        results = store.load_results(chunk)
        referenced = [i for i, result in zip(chunk, results, strict=True) if result.mask_url is not None]
        done = {i for i, (is_done, _) in zip(referenced, store.outcomes(referenced), strict=True) if is_done}
        for image_id, result in zip(chunk, results, strict=True):
            name, failure = names.get(image_id) or image_id, failures.get(image_id)
            if result.mask_url is not None:
                if _collect_reference(report, name, result.mask_url, image_id in done, failure):
                    referenced_ids.append(image_id)
            elif _collect_one(report, out_dir, name, result, failure):
                written_ids.append(image_id)
            on_progress()
        if delete:
            store.forget(written_ids)
            store.forget(referenced_ids, masks=False)  # their masks are at their mask URLs, never in Redis
    return report


def _collect_reference(report: CollectReport, name: str, mask_url: str, done: bool, failure: str | None) -> bool:
    """Note the outcome of one image enqueued by reference in `report`; True if it has one (done with its mask in
    place, or failed), so that --delete may free it."""
    if failure is not None:
        report.failed[name] = failure
        return True
    if not done:
        report.pending.append(name)
        return False
    if not storage.is_url(mask_url) and not Path(mask_url).is_file():
        report.failed[name] = f"marked done, but its mask {mask_url} is not there (moved or deleted since?)"
        return False
    report.in_place[name] = mask_url
    return True


def _collect_one(report: CollectReport, out_dir: Path, name: str, result: StoredMask, failure: str | None) -> bool:
    """Write one image's mask or note why not in `report`; True if its mask file was written."""
    if result.error is not None:
        report.failed[name] = result.error
    elif result.mask is not None and result.original_size is not None:
        try:
            report.written.append(write_mask(out_dir, name, result.mask, result.original_size))
            return True
        except MaskNotWritten as exc:
            report.failed[name] = str(exc)
    elif failure is not None:
        report.failed[name] = failure
    else:
        report.pending.append(name)
    return False


def _collect_tiled(store: QueueStore, report: CollectReport, out_dir: Path, parent_id: str,
                   image: TiledImage | str | None, failures: dict[str, str]) -> bool:
    """Stitch and write one tiled image or stack (producer/collect_tiled.py), or note why not; True if written."""
    if image is None:  # its tiles are being stored: the record comes last
        report.pending.append(parent_id)
        return False
    if isinstance(image, str):
        report.failed[parent_id] = image
        return False
    finished, failure = tiled_outcome(store, image, failures)
    if failure is not None:
        report.failed[image.name] = failure
        return False
    if not finished:
        report.pending.append(image.name)
        return False
    try:
        report.written.append(write_tiled(store, image, mask_path(out_dir, image.name), mask_to_png_values))
        return True
    except TileProblem as exc:
        report.failed[image.name] = str(exc)
    except (OSError, ValueError) as exc:  # a name outside out_dir, a file in the way, a full disk, ...
        report.failed[image.name] = f"cannot write its mask under {out_dir}: {exc}"
    return False


def absorb(into: CollectReport, report: CollectReport) -> None:
    """Add one collect task's report to a running total (collect tasks run in parallel)."""
    into.written.extend(report.written)
    into.failed.update(report.failed)
    into.pending.extend(report.pending)
    into.in_place.update(report.in_place)


def mask_destinations(report: CollectReport) -> list[str]:
    """The `--out DEST` locations the `in_place` masks went to (each mask URL less the mask's relative name), sorted."""
    roots = set()
    for name, mask_url in report.in_place.items():
        try:
            relative = "/" + storage.mask_name(name)
        except ValueError:  # the worker could not have written it: name the mask itself
            relative = ""
        roots.add(mask_url.removesuffix(relative) if relative and mask_url.endswith(relative) else mask_url)
    return sorted(roots)
