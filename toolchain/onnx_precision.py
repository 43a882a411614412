"""What the FP16 (toolchain.fp16) and INT8 (toolchain.int8) ONNX builds share: the result record,
the source checks, the self-check against the FP32 source and a quiet context for onnxruntime's tools.

Metadata (`<file>.onnx.json`) is the source's EngineSpec with precision "fp16" or "int8" and, in
built_with, what was done: calibration method, number of images, their folder's name, quantization
layout, target, ONNX Runtime version, and a self-check against the FP32 source.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.base import EngineError, EngineSpec
from toolchain.onnx_checks import check_onnx

#: images per calibration batch (histogram methods keep one batch of activations in memory)
CALIB_BATCH = 4
#: synthetic images used to check a converted file against its FP32 source (seed, count)
CHECK_SEED, CHECK_IMAGES = 4242, 2


@dataclass(frozen=True)
class PrecisionResult:
    """What `convert_fp16` / `quantize_int8` wrote.

    path: the ONNX file. metadata: `<path>.json`. spec: its EngineSpec. ops: operator counts of the
    written graph. max_abs_diff: largest |logit - logit_fp32| on the check images (logit units).
    agreement: fraction of mask pixels equal to the FP32 source's masks on those images (0..1).
    skipped: calibration files that could not be decoded ("path: reason"), skipped.
    """

    path: Path
    metadata: Path
    spec: EngineSpec
    ops: dict[str, int]
    max_abs_diff: float
    agreement: float
    skipped: tuple[str, ...] = ()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's logging warnings, Python warnings and progress prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def source_spec(source: Path, output: Path) -> EngineSpec:
    """The FP32 source's spec; EngineError if the files are unusable."""
    if not source.is_file():
        raise EngineError(f"{source}: ONNX file not found")
    if source.suffix.lower() != ".onnx":
        raise EngineError(f"{source}: the source must be an FP32 .onnx file")
    if output.suffix.lower() != ".onnx":
        raise EngineError(f"{output}: the output of an FP16/INT8 conversion is an ONNX file; name it *.onnx")
    if output.resolve() == source.resolve():
        raise EngineError(f"{output}: output would overwrite its source; choose another name")
    spec = EngineSpec.read_beside(source)
    if spec.precision != "fp32":
        raise EngineError(f"{source}: is a {spec.precision} model; convert from the FP32 ONNX file")
    return spec


def check_images(spec: EngineSpec, n: int = CHECK_IMAGES, seed: int = CHECK_SEED) -> np.ndarray:
    """n synthetic uint8 (n, H, W) images at the spec's size, for self-checks."""
    from toolchain.synth import generate

    side = max(spec.height, spec.width)
    return np.stack([image[: spec.height, : spec.width] for image, _ in generate(n, side, seed)])


def onnx_logits(path: Path | str, spec: EngineSpec, images: np.ndarray) -> np.ndarray:
    """float32 logits (N, classes, H, W) of an ONNX file on uint8 images (N, H, W), ONNX Runtime CPU."""
    import onnxruntime as ort

    from engines.onnx_engine import normalize_array

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip()[:300]})") from None
    batch = batch_for(session, spec)
    x = normalize_array(images, spec.normalization)
    outs = [session.run(None, {spec.input_name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32)


def batch_for(session, spec: EngineSpec) -> int:
    """Batch size to feed: the graph's fixed batch if it has one, else up to CALIB_BATCH."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else max(1, min(CALIB_BATCH, spec.max_batch))


def compare_with_source(source: Path, output: Path, spec: EngineSpec) -> tuple[float, float]:
    """(max |logit difference|, mask agreement) of output vs source on the check images."""
    images = check_images(spec)
    ref = onnx_logits(source, spec, images)
    got = onnx_logits(output, spec, images)
    if got.shape != ref.shape:
        raise EngineError(f"{output}: output shape {got.shape} differs from the source's {ref.shape}")
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    return float(np.abs(got - ref).max()), agreement


def write_checked(model, output: Path) -> None:
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    check_onnx(model, output, "converted")
    onnx.save(model, str(output))


def carried_keys(spec: EngineSpec) -> dict[str, str]:
    """Keys of the source's built_with worth keeping (model identity)."""
    return {k: spec.built_with[k] for k in ("unet_width", "opset") if k in spec.built_with}
