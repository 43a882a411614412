"""The engine interface every backend implements, and the metadata every engine file carries.

An engine takes a batch of uint8 grayscale images (N, H, W) and returns uint8 class masks (N, H, W).
Normalization (uint8 -> float) and argmax happen inside the engine, on its device, so that only
uint8 crosses the host/device boundary. Work is submitted asynchronously: `submit()` returns an
`InFlight` handle at once, and `InFlight.result()` waits for the masks. A worker keeps up to
`Engine.slots` batches in flight (double buffering), so Redis I/O overlaps compute.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

DEFAULT_SLOTS = 2  # batches in flight on an engine unless told otherwise: one computing, one queued


class EngineError(Exception):
    """An engine file cannot be loaded or run; the message says which file and what to do."""


@dataclass(frozen=True)
class Normalization:
    """How uint8 pixels become model input: x = (pixel * scale - mean) / std."""

    scale: float = 1.0 / 255.0
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class EngineSpec:
    """What an engine expects and what built it.

    input_name: the model's input tensor name. height/width: input size in pixels (the producer
    resizes images to it). min_batch/max_batch: batch sizes the engine accepts. precision:
    "fp32", "fp16" or "int8". classes: number of output classes (mask values are 0..classes-1).
    built_with: versions and device that produced the file (free-form, shown by `engines info`).
    """

    input_name: str = "image"
    height: int = 512
    width: int = 512
    channels: int = 1
    classes: int = 2
    min_batch: int = 1
    max_batch: int = 8
    precision: str = "fp32"
    normalization: Normalization = field(default_factory=Normalization)
    built_with: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialize as JSON text (what sits beside or inside an engine file)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> EngineSpec:
        """Build from a JSON-decoded dict; unknown keys are ignored, missing ones take defaults."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if isinstance(known.get("normalization"), dict):
            known["normalization"] = Normalization(**known["normalization"])
        return cls(**known)

    @classmethod
    def read_beside(cls, engine_path: Path) -> EngineSpec:
        """Read `<engine>.json` next to an engine file; raise EngineError naming the file if absent/bad."""
        meta = metadata_path(engine_path)
        try:
            return cls.from_dict(json.loads(meta.read_text()))
        except FileNotFoundError:
            raise EngineError(f"{engine_path}: metadata file {meta} is missing") from None
        except (ValueError, TypeError) as exc:
            raise EngineError(f"{meta}: unreadable engine metadata ({exc})") from None


def metadata_path(engine_path: Path) -> Path:
    """The metadata file that sits beside an engine: `unet.onnx` -> `unet.onnx.json`."""
    return engine_path.with_name(engine_path.name + ".json")


class InFlight(Protocol):
    """A submitted batch. `result()` blocks until its masks are ready (uint8, (N, H, W))."""

    def result(self) -> np.ndarray: ...


class Engine(Protocol):
    """A loaded engine: one owner of its device resources, closed with `close()`."""

    spec: EngineSpec
    name: str  # short description for logs, e.g. "onnxruntime:cpu fp32 unet_w16.onnx"
    slots: int  # how many batches may be in flight at once (>= 1)

    def submit(self, images: np.ndarray) -> InFlight:
        """Start inference on uint8 images of shape (N, H, W), 1 <= N <= spec.max_batch."""
        ...

    def close(self) -> None:
        """Release device memory, sessions and threads. Idempotent."""
        ...


class EngineBase:
    """What every engine shares: the checked `submit`, an idempotent `close` and the context manager.

    A subclass sets `spec` and `name`, implements `_start(images) -> InFlight` (images already
    checked against the spec) and `_release()` (free sessions, threads, device memory; called once).
    """

    spec: EngineSpec
    name: str
    slots: int = DEFAULT_SLOTS
    _closed: bool = False

    def _start(self, images: np.ndarray) -> InFlight:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def submit(self, images: np.ndarray) -> InFlight:
        """Check and start one uint8 (N, H, W) batch; returns an InFlight of uint8 (N, H, W) masks."""
        if self._closed:
            raise EngineError(f"{self.name}: engine is closed")
        check_batch(self.spec, images)
        return self._start(images)

    def close(self) -> None:
        """Finish in-flight batches and release the engine's resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def infer(engine: Engine, images: np.ndarray) -> np.ndarray:
    """Run one batch synchronously: uint8 (N, H, W) in, uint8 masks (N, H, W) out."""
    return engine.submit(images).result()


def check_batch(spec: EngineSpec, images: np.ndarray) -> None:
    """Raise EngineError unless `images` is uint8 (N, H, W) matching the spec's size and batch range."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise EngineError(f"engine input must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    n, h, w = images.shape
    if (h, w) != (spec.height, spec.width):
        raise EngineError(f"engine expects {spec.height}x{spec.width} images, got {h}x{w}")
    if not spec.min_batch <= n <= spec.max_batch:
        raise EngineError(f"batch of {n} is outside the engine's range {spec.min_batch}..{spec.max_batch}")
