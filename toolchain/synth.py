"""Synthetic microscopy-like images with exact ground-truth masks (for demos, tests and Dice).

Each image is a field of cells: ellipses with blobby (low-order harmonic) outlines, of varied size
and brightness, partly clustered so that many touch or overlap, some with a darker or brighter
nucleus. The scene is rendered as fluorescence-like intensity on a textured background, multiplied
by an uneven illumination field (a tilted plane plus a smooth bump), blurred by a Gaussian point
spread function, corrupted by signal-dependent (Poisson-like) and read (Gaussian) noise, and mapped
to uint8 with a random contrast window. The mask is the union of the cell outlines before blur:
1 = cell, 0 = background.

Everything is deterministic from `(seed, index)`: image i of `generate(n, size, seed)` is the same
for every n. Cell sizes are in absolute pixels (a fixed magnification), so a crop of a 512-px image
looks like a smaller image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

#: cell radius range in pixels (semi-axis before the blobby outline)
RADIUS_RANGE = (6.0, 22.0)
#: range of the fraction of the image the cells aim to cover
COVERAGE_RANGE = (0.15, 0.5)
#: mask PNGs store 0 (background) and 255 (cell); readers threshold at this value
MASK_THRESHOLD = 128


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float32 (H, W) array, sigma in pixels, reflected borders."""
    if sigma <= 0:
        return img
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = img.shape
    padded = np.pad(img, ((radius, radius), (0, 0)), mode="reflect")
    tmp = np.zeros_like(img)
    for k, wk in enumerate(kernel):
        tmp += wk * padded[k : k + h]
    padded = np.pad(tmp, ((0, 0), (radius, radius)), mode="reflect")
    out = np.zeros_like(img)
    for k, wk in enumerate(kernel):
        out += wk * padded[:, k : k + w]
    return out


Size = int | tuple[int, int]
"""An image size: a side in pixels (square), or (height, width)."""


def _sides(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def smooth_field(rng: np.random.Generator, size: Size, grid: int | tuple[int, int]) -> np.ndarray:
    """A smooth random float32 (height, width) field, about zero mean and unit scale.

    grid: number of random control points per side, or (rows, columns) (2-4: illumination; 8-32: texture).
    """
    height, width = _sides(size)
    coarse = rng.standard_normal(_sides(grid)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC))


def _cell_centers(rng: np.random.Generator, size: Size, n: int, radii: np.ndarray) -> np.ndarray:
    """Centers (n, 2) in pixels (y, x): about a third isolated, the rest in touching/overlapping chains."""
    centers = np.empty((n, 2), dtype=np.float64)
    i = 0
    extent = np.asarray(_sides(size), dtype=np.float64)
    while i < n:
        start = rng.uniform(0, 1, 2) * extent  # the same draws as uniform(0, side, 2) for a square
        centers[i] = start
        i += 1
        if rng.random() < 0.35:
            continue  # isolated cell
        chain = int(rng.integers(1, 6))
        prev = start
        for _ in range(chain):
            if i >= n:
                break
            angle = rng.uniform(0, 2 * math.pi)
            dist = (radii[i - 1] + radii[i]) * rng.uniform(0.65, 1.05)
            prev = prev + dist * np.array([math.cos(angle), math.sin(angle)])
            centers[i] = prev
            i += 1
    return centers


def render(rng: np.random.Generator, size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: (image uint8 (height, width), mask uint8 (height, width) in {0, 1}); size: a side or
    (height, width)."""
    height, width = _sides(size)
    area = float(height * width)
    coverage = rng.uniform(*COVERAGE_RANGE)
    r_lo, r_hi = RADIUS_RANGE
    mean_area = math.pi * ((r_lo + r_hi) / 2) ** 2
    n = int(rng.poisson(coverage * area / mean_area))

    background = rng.uniform(0.04, 0.25)
    signal = np.full((height, width), background, dtype=np.float32)
    # background texture: smooth mottling plus a finer grain
    signal += rng.uniform(0.01, 0.04) * smooth_field(rng, size, (max(2, height // 48), max(2, width // 48)))
    signal += rng.uniform(0.005, 0.02) * smooth_field(rng, size, (max(2, height // 8), max(2, width // 8)))
    mask = np.zeros((height, width), dtype=bool)

    radii = np.exp(rng.uniform(math.log(r_lo), math.log(r_hi), n)) if n else np.empty(0)
    centers = _cell_centers(rng, size, n, radii) if n else np.empty((0, 2))
    for (cy, cx), r in zip(centers, radii, strict=True):
        a = r * rng.uniform(0.9, 1.25)  # semi-axes
        b = r * rng.uniform(0.6, 1.0)
        phi = rng.uniform(0, math.pi)
        harmonics = [(k, rng.uniform(0, 0.09), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)]
        reach = a * 1.4 + 1
        y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
        u = (dx * math.cos(phi) + dy * math.sin(phi)) / a
        v = (-dx * math.sin(phi) + dy * math.cos(phi)) / b
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        edge = np.ones_like(rho)
        for k, amp, ph in harmonics:
            edge += amp * np.cos(k * theta + ph)
        inside = rho < edge
        if not inside.any():
            continue
        t = np.clip(rho / edge, 0.0, 1.0)
        brightness = rng.uniform(0.22, 0.9)
        profile = brightness * (1.0 - rng.uniform(0.0, 0.45) * t * t)  # dimmer or flat towards the rim
        if rng.random() < 0.6:  # a nucleus, darker or brighter than the cytoplasm
            nuc = rng.uniform(0.3, 0.55)
            profile *= np.where(t < nuc, rng.uniform(0.7, 1.4), 1.0).astype(np.float32)
        profile *= 1.0 + rng.uniform(0.0, 0.15) * rng.standard_normal(profile.shape).astype(np.float32)
        region = signal[y0:y1, x0:x1]
        # overlapping cells add up a little (fluorescence), capped so overlaps stay plausible
        region[inside] = np.maximum(region[inside], background) + profile[inside] * np.where(
            mask[y0:y1, x0:x1][inside], 0.5, 1.0
        )
        mask[y0:y1, x0:x1] |= inside

    # uneven illumination: tilted plane + smooth bump, multiplicative, about 0.55..1.45
    yy = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    xx = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    tilt = rng.uniform(-0.5, 0.5, 2)
    illumination = 1.0 + tilt[0] * yy + tilt[1] * xx + rng.uniform(0.0, 0.15) * smooth_field(rng, size, 3)
    signal *= np.clip(illumination, 0.4, 1.6)

    signal = gaussian_blur(signal, rng.uniform(0.6, 2.0))

    photons = rng.uniform(40.0, 400.0)  # photons at intensity 1: sets shot noise
    noise = np.sqrt(np.maximum(signal, 0.0) / photons) * rng.standard_normal(signal.shape, dtype=np.float32)
    noise += rng.uniform(0.004, 0.02) * rng.standard_normal(signal.shape, dtype=np.float32)
    signal += noise

    # random contrast window -> uint8
    lo = rng.uniform(-0.05, 0.6) * background
    hi = rng.uniform(0.7, 1.3) * float(np.percentile(signal[::4, ::4], 99.5) if n else 1.0)
    hi = max(hi, lo + 0.1)
    gamma = rng.uniform(0.8, 1.25)
    scaled = np.clip((signal - lo) / (hi - lo), 0.0, 1.0) ** gamma
    image = (scaled * 255.0 + 0.5).astype(np.uint8)
    return image, mask.astype(np.uint8)


def generate(n: int, size: Size = 512, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield n (image uint8 (height, width), mask uint8 (height, width) in {0, 1}) pairs; size: a side or
    (height, width).

    Image i is rendered from the seed sequence (seed, i), so it does not depend on n.
    """
    if min(_sides(size)) < 16:
        raise ValueError(f"synthetic images must be at least 16 px a side, got {size}")
    for i in range(n):
        yield render(np.random.default_rng([seed, i]), size)


def generate_stack(pages: int, size: Size = 512, seed: int = 0, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack `index`: (images uint8 (pages, height, width), masks uint8 (pages, height, width) in {0, 1}).

    Page p is rendered from the seed sequence (seed, index, p): a stack's pages are distinct scenes.
    """
    if pages < 1 or min(_sides(size)) < 16:
        raise ValueError(f"a stack needs at least one page of at least 16 px a side, got {pages} of {size}")
    rendered = [render(np.random.default_rng([seed, index, page]), size) for page in range(pages)]
    return np.stack([image for image, _ in rendered]), np.stack([mask for _, mask in rendered])


def parse_size(text: str) -> tuple[int, int]:
    """"512" -> (512, 512); "2048x1536" (width x height, as image sizes are written) -> (1536, 2048)."""
    parts = text.lower().split("x")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"size must be N or WIDTHxHEIGHT in pixels, got {text!r}") from None
    if len(sides) == 1:
        return sides[0], sides[0]
    if len(sides) != 2:
        raise ValueError(f"size must be N or WIDTHxHEIGHT in pixels, got {text!r}")
    return sides[1], sides[0]


#: subfolder of an `engines synth` directory holding the images
IMAGES_DIR = "images"
#: subfolder holding the exact masks (not `masks/`: that is where `producer collect --out` puts predictions)
TRUTH_DIR = "truth"


def write_dataset(out_dir: Path | str, n: int, size: Size = 512, seed: int = 0, progress: bool = True,
                  pages: int = 1) -> Path:
    """Write n pairs as `out_dir/images/img_00000.png` (8-bit gray) and `out_dir/truth/img_00000.png`.

    size: a side or (height, width). pages > 1: n multi-page TIFF stacks instead,
    `images/stack_00000.tif` and `truth/stack_00000.tif` (page p of stack i from generate_stack).
    Mask PNGs and TIFF pages store 0 (background) and 255 (cell) for visibility; readers threshold at
    128 (`read_mask`, `read_masks`). Returns out_dir.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / TRUTH_DIR).mkdir(parents=True, exist_ok=True)
    if pages > 1:
        import tifffile

        for i in tqdm(range(n), desc="synth", unit="stack", disable=not progress):
            images, masks = generate_stack(pages, size, seed, i)
            name = f"stack_{i:05d}.tif"
            tifffile.imwrite(out / IMAGES_DIR / name, images, photometric="minisblack", metadata=None)
            tifffile.imwrite(out / TRUTH_DIR / name, masks * np.uint8(255), photometric="minisblack",
                             compression="zlib", metadata=None)
        return out
    for i, (image, mask) in enumerate(
        tqdm(generate(n, size, seed), total=n, desc="synth", unit="img", disable=not progress)
    ):
        name = f"img_{i:05d}.png"
        Image.fromarray(image).save(out / IMAGES_DIR / name)
        Image.fromarray(mask * np.uint8(255)).save(out / TRUTH_DIR / name)
    return out


def read_mask(path: Path | str) -> np.ndarray:
    """Read a mask PNG written by `write_dataset` as uint8 (H, W) in {0, 1} (threshold 128)."""
    data = np.asarray(Image.open(path).convert("L"))
    return (data >= MASK_THRESHOLD).astype(np.uint8)


def read_masks(path: Path | str) -> np.ndarray:
    """Every page of a mask file (PNG, or a multi-page TIFF as `write_dataset` and `producer collect` write them)
    as uint8 (pages, H, W) in {0, 1} (threshold 128)."""
    if Path(path).suffix.lower() in (".tif", ".tiff"):
        import tifffile

        data = tifffile.imread(path)
        data = data[None] if data.ndim == 2 else data
        return (data >= MASK_THRESHOLD).astype(np.uint8)
    return read_mask(path)[None]
