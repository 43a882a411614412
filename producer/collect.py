"""Collect stage: masks back from Redis as PNG files at each image's original size, under its relative name.

A mask of class ids c (0..classes-1) is written as 8-bit gray c * 255 // (classes - 1): for the
2-class U-Net, background 0 and foreground 255. `a/b/cell.tif` becomes `OUT/a/b/cell.png`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from broker.store import QueueStore
from common.images import resize_mask

NUM_CLASSES = 2


@dataclass
class CollectReport:
    """What a collect run wrote, what failed (name -> reason) and what has no mask yet (names)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def mask_path(out_dir: Path, name: str) -> Path:
    """Where the mask of the image named `name` (a relative POSIX path) is written."""
    relative = Path(*Path(name).parts).with_suffix(".png")
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"refusing to write outside {out_dir}: {name}")
    return out_dir / relative


def mask_to_png_values(mask: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    """Class ids (uint8 (H, W)) -> visible gray levels: c * 255 // (classes - 1)."""
    return (mask.astype(np.uint16) * (255 // max(1, classes - 1))).astype(np.uint8)


ROUND_TRIP_IMAGES = 64  # masks read (and forgotten) per Redis round trip


def collect_masks(
    store: QueueStore,
    out_dir: Path,
    image_ids: list[str] | None = None,
    on_progress: Callable[[], None] = lambda: None,
    delete: bool = False,
) -> CollectReport:
    """Write a PNG for every image (or every one of `image_ids`) that has a mask; report the rest.

    Masks are read ROUND_TRIP_IMAGES at a time. A mask that cannot be read (stored by an older
    segqueue version, or corrupt) is reported as failed with the reason, and collect goes on.
    delete: once a mask file is written, delete the image and its mask from Redis (failed and
    unfinished images stay), so that a long-running queue does not grow without bound.
    """
    names = store.manifest() if image_ids is None else store.names(image_ids)
    wanted = list(names) if image_ids is None else image_ids
    failures = store.failures()
    report = CollectReport()
    for start in range(0, len(wanted), ROUND_TRIP_IMAGES):
        chunk = wanted[start:start + ROUND_TRIP_IMAGES]
        written_ids = []
        for image_id, result in zip(chunk, store.load_results(chunk)):
            name = names.get(image_id) or image_id
            if result.error is not None:
                report.failed[name] = result.error
            elif result.mask is not None and result.original_size is not None:
                path = mask_path(out_dir, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask_to_png_values(resize_mask(result.mask, *result.original_size))).save(path)
                report.written.append(path)
                written_ids.append(image_id)
            elif image_id in failures:
                report.failed[name] = failures[image_id]
            else:
                report.pending.append(name)
            on_progress()
        if delete:
            store.forget(written_ids)
    return report


def absorb(into: CollectReport, report: CollectReport) -> None:
    """Add one collect task's report to a running total (collect tasks run in parallel)."""
    into.written.extend(report.written)
    into.failed.update(report.failed)
    into.pending.extend(report.pending)
