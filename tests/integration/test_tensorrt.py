"""TensorRT plans for real: build from ONNX, load, run, compare with ONNX Runtime.

Needs `import tensorrt` (10.x or 11.x) and a CUDA device. Where TensorRT is not installed (this
project's CPU machines, and its GPU machine so far) the whole module is SKIPPED, not faked; the
checks around TensorRT that need no TensorRT (torch2trt parsing, metadata and shape refusals, the
missing-TensorRT message) run in tests/unit/test_loader_checks.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip(
    "tensorrt",
    reason=(
        "TensorRT is not installed: ALL TensorRT tests were SKIPPED (plan build, load, run, masks vs ONNX Runtime, "
        "torch2trt execution); install TensorRT 10.x/11.x with a CUDA GPU to run them"
    ),
)

import torch  # noqa: E402

from engines.base import EngineError, infer, metadata_path  # noqa: E402
from engines.loader import load_engine  # noqa: E402
from engines.onnx_engine import OnnxEngine  # noqa: E402
from engines.tensorrt_engine import TensorRTEngine  # noqa: E402
from toolchain.synth import generate  # noqa: E402
from toolchain.tensorrt_build import build_plan  # noqa: E402

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT tests need a CUDA device: SKIPPED"),
]

SIZE = 64


@pytest.fixture(scope="module")
def onnx_w8(small_engine: Path) -> Path:
    """The suite's width-8, 64 px ONNX engine (tests/integration/conftest.py)."""
    return small_engine


@pytest.fixture(scope="module")
def plan(onnx_w8: Path) -> Path:
    return build_plan(onnx_w8, onnx_w8.with_name("unet_w8.trt"), min_batch=1, opt_batch=8, max_batch=8)


def _images(n: int) -> np.ndarray:
    return np.stack([img for img, _ in generate(n, SIZE, seed=11)])


def test_plan_metadata(plan: Path) -> None:
    meta = json.loads(metadata_path(plan).read_text())
    assert meta["built_with"]["tensorrt"] == trt.__version__
    assert meta["built_with"]["gpu"] == torch.cuda.get_device_name()
    assert (meta["height"], meta["width"], meta["min_batch"], meta["max_batch"]) == (SIZE, SIZE, 1, 8)
    assert meta["precision"] == "fp32" and meta["built_with"]["source"] == "unet_w8.onnx"


def test_plan_masks_match_onnxruntime(plan: Path, onnx_w8: Path) -> None:
    images = _images(8)
    with OnnxEngine(onnx_w8) as ort_engine, TensorRTEngine(plan) as engine:
        for n in (1, 5, 8):
            expected = infer(ort_engine, images[:n])
            got = infer(engine, images[:n])
            assert got.shape == (n, SIZE, SIZE) and got.dtype == np.uint8
            assert float((got == expected).mean()) >= 0.995  # TensorRT may use TF32 for FP32 layers
        alone = [infer(engine, images[i : i + 2]) for i in range(3)]
        flights = [engine.submit(images[i : i + 2]) for i in range(3)]
        for expected, flight in zip(alone, flights, strict=True):
            assert np.array_equal(flight.result(), expected)


def test_loader_opens_plans(plan: Path) -> None:
    with load_engine(plan, device="cuda") as engine:
        assert isinstance(engine, TensorRTEngine) and engine.spec.precision == "fp32"
    with pytest.raises(EngineError, match="fp16 was requested"):
        load_engine(plan, device="cuda", precision="fp16")


def test_plan_for_another_gpu_is_refused(plan: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.trt"
    other.write_bytes(plan.read_bytes())
    meta = json.loads(metadata_path(plan).read_text())
    meta["built_with"]["gpu"] = "Some Other GPU"
    metadata_path(other).write_text(json.dumps(meta))
    with pytest.raises(EngineError, match=r"gpu 'Some Other GPU'.*engines build unet_w8.onnx -o other.trt"):
        TensorRTEngine(other)


def test_parser_errors_are_reported(tmp_path: Path, onnx_w8: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_w8.read_bytes()[: len(onnx_w8.read_bytes()) // 2])
    metadata_path(broken).write_text(metadata_path(onnx_w8).read_text())
    with pytest.raises(EngineError, match="broken.onnx"):
        build_plan(broken, tmp_path / "broken.trt")


def test_torch2trt_layout_runs(plan: Path, onnx_w8: Path, tmp_path: Path) -> None:
    import collections

    state = collections.OrderedDict(
        engine=bytearray(plan.read_bytes()), input_names=["image"], output_names=["logits"]
    )
    path = tmp_path / "unet_trt.pth"
    torch.save(state, path)
    images = _images(4)
    with pytest.warns(UserWarning, match="no metadata file"):
        engine = load_engine(path, device="cuda")
    with engine, OnnxEngine(onnx_w8) as ort_engine:
        assert (engine.spec.height, engine.spec.max_batch) == (SIZE, 8)
        assert float((infer(engine, images) == infer(ort_engine, images)).mean()) >= 0.995
