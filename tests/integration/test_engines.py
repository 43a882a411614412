"""Engines: checkpoints of an exported model, ONNX export, ONNX Runtime and torch engines, loader.

Real torch and onnxruntime on tiny models (width 8, 64 px); the shipped demo model at 512 px.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
from common.metrics import mean_dice
from engines.base import EngineError, EngineSpec, Normalization, check_batch, infer, metadata_path
from engines.checkpoint import FORMAT, load_checkpoint, load_model
from engines.loader import load_engine, read_spec
from engines.onnx_engine import OnnxEngine
from engines.torch_engine import TorchEngine
from engines.unet import UNet, UNetConfig
from tests.conftest import tiny_checkpoint, tiny_unet
from toolchain.export import export_onnx
from toolchain.synth import generate

SIZE = 64
MAX_BATCH = 4


def _tiny_model() -> UNet:
    """A width-8 U-Net with non-trivial BatchNorm statistics and a head bias that splits classes ~50/50."""
    model = tiny_unet(bn_stats=True)
    images = _images(4)
    with torch.inference_mode():
        logits = model(_to_input(images))
        margin = (logits[:, 1] - logits[:, 0]).median()
        model.head.bias[1] -= margin
    return model


def _images(n: int, seed: int = 3) -> np.ndarray:
    return np.stack([img for img, _ in generate(n, SIZE, seed)])


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().unsqueeze(1) / 255.0


def _reference_masks(model: UNet, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(_to_input(images)).argmax(dim=1).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny checkpoint and its ONNX export (64x64, batch 1..4), plus the model itself."""
    root = tmp_path_factory.mktemp("engines")
    model = _tiny_model()
    ckpt = tiny_checkpoint(root / "tiny.pt", SIZE, MAX_BATCH, model, training={"command": "test", "heldout_dice": 0.5})
    result = export_onnx(ckpt, root / "tiny.onnx", SIZE, SIZE, max_batch=MAX_BATCH)
    return {"model": model, "ckpt": ckpt, "onnx": result.path, "export": result, "root": root}


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_round_trip(tiny) -> None:
    ckpt = load_checkpoint(tiny["ckpt"])
    assert ckpt.config == UNetConfig(width=8)
    assert ckpt.spec.height == SIZE and ckpt.spec.max_batch == MAX_BATCH
    assert ckpt.training == {"command": "test", "heldout_dice": 0.5}
    raw = torch.load(tiny["ckpt"], map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT
    model, _ = load_model(tiny["ckpt"])
    for (k, v), (k2, v2) in zip(model.state_dict().items(), tiny["model"].state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


# -- ONNX export ---------------------------------------------------------------------------------


def test_onnx_export_graph_and_parity(tiny) -> None:
    import onnx

    result = tiny["export"]
    graph = onnx.load(str(result.path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "Pad" not in ops and "Conv" in ops
    assert result.max_abs_diff < 1e-3
    (inp,) = graph.graph.input
    assert inp.name == "image"
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, SIZE, SIZE]
    assert graph.graph.output[0].name == "logits"


def test_onnx_metadata_round_trip(tiny) -> None:
    meta = metadata_path(tiny["onnx"])
    assert meta.name == "tiny.onnx.json"
    spec = EngineSpec.read_beside(tiny["onnx"])
    assert spec == tiny["export"].spec
    assert EngineSpec.from_dict(json.loads(spec.to_json())) == spec
    assert (spec.height, spec.width, spec.min_batch, spec.max_batch) == (SIZE, SIZE, 1, MAX_BATCH)
    assert spec.precision == "fp32" and spec.normalization == Normalization(scale=1 / 255)
    for key in ("torch", "onnx", "onnxruntime", "device"):
        assert key in spec.built_with
    assert read_spec(tiny["onnx"]) == spec and read_spec(tiny["ckpt"]).max_batch == MAX_BATCH


def test_export_rejects_bad_size(tiny, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="multiple of 16"):
        export_onnx(tiny["ckpt"], tmp_path / "x.onnx", 60, 64)


# -- engines -------------------------------------------------------------------------------------


def test_onnx_engine_matches_torch(tiny) -> None:
    images = _images(MAX_BATCH, seed=21)
    expected = _reference_masks(tiny["model"], images)
    assert 0.1 < expected.mean() < 0.9  # both classes present: the comparison means something
    with OnnxEngine(tiny["onnx"]) as engine:
        assert engine.slots == 2 and engine.spec.max_batch == MAX_BATCH
        first = engine.submit(images)
        second = engine.submit(images[:1])  # two in flight
        masks, single = first.result(), second.result()
    assert masks.dtype == np.uint8 and masks.shape == images.shape
    assert (masks == expected).mean() >= 0.999
    assert np.array_equal(single, masks[:1])


def test_torch_engine_matches_torch(tiny) -> None:
    images = _images(3, seed=22)
    expected = _reference_masks(tiny["model"], images)
    engine = TorchEngine(tiny["ckpt"])
    try:
        masks = infer(engine, images)
        assert masks.dtype == np.uint8
        assert np.array_equal(masks, expected)
    finally:
        engine.close()
    engine.close()  # idempotent
    with pytest.raises(EngineError, match="closed"):
        engine.submit(images)


def test_torch_engine_refuses_fp16_on_cpu(tiny) -> None:
    with pytest.raises(EngineError, match="fp16"):
        TorchEngine(tiny["ckpt"], precision="fp16")


def test_check_batch_rejects_wrong_input(tiny) -> None:
    spec = EngineSpec(height=SIZE, width=SIZE, max_batch=MAX_BATCH)
    good = np.zeros((2, SIZE, SIZE), np.uint8)
    check_batch(spec, good)
    bad = [
        good.astype(np.float32),
        good[0],
        np.zeros((2, 1, SIZE, SIZE), np.uint8),
        np.zeros((2, SIZE, SIZE + 16), np.uint8),
        np.zeros((0, SIZE, SIZE), np.uint8),
        np.zeros((MAX_BATCH + 1, SIZE, SIZE), np.uint8),
    ]
    for images in bad:
        with pytest.raises(EngineError):
            check_batch(spec, images)
    with OnnxEngine(tiny["onnx"]) as engine:
        with pytest.raises(EngineError, match="64x64"):
            engine.submit(np.zeros((1, SIZE, SIZE + 16), np.uint8))


def test_load_engine_dispatch_and_errors(tiny, tmp_path: Path) -> None:
    with load_engine(tiny["onnx"]) as engine:
        assert isinstance(engine, OnnxEngine) and "tiny.onnx" in engine.name
    engine = load_engine(tiny["ckpt"])
    assert isinstance(engine, TorchEngine)
    engine.close()
    unknown = tmp_path / "model.bin"
    unknown.write_bytes(b"x")
    with pytest.raises(EngineError, match="model.bin"):
        load_engine(unknown)
    with pytest.raises(EngineError, match="nowhere.onnx"):
        load_engine(tmp_path / "nowhere.onnx")
    with pytest.raises(EngineError, match="nowhere.pt"):
        load_engine(tmp_path / "nowhere.pt")
    with pytest.raises(EngineError, match="TensorRT"):
        load_engine(tmp_path / "unet.plan")
    with pytest.raises(EngineError, match="int8"):
        load_engine(tiny["onnx"], precision="int8")


def test_onnx_engine_needs_metadata(tiny, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(Path(tiny["onnx"]).read_bytes())
    with pytest.raises(EngineError, match="lonely.onnx.json"):
        OnnxEngine(lonely)
    # metadata that disagrees with the graph is refused
    spec = asdict(tiny["export"].spec)
    spec["height"] = 128
    metadata_path(lonely).write_text(json.dumps(spec))
    with pytest.raises(EngineError, match="height"):
        OnnxEngine(lonely)


# -- training and CLI ----------------------------------------------------------------------------


def test_cli_info(tiny) -> None:
    from typer.testing import CliRunner

    from toolchain.cli import app

    result = CliRunner().invoke(app, ["info", str(tiny["onnx"])])
    assert result.exit_code == 0, result.output
    assert "1..4" in result.output and "onnxruntime=" in result.output


# -- the shipped demo model ----------------------------------------------------------------------


@pytest.mark.slow  # full size: the 512 px demo engine
def test_demo_engine_segments_synthetic_images() -> None:
    assert engines.DEMO_ONNX.is_file(), f"demo model missing: {engines.DEMO_ONNX}"
    pairs = list(generate(4, 512, seed=424242))
    with load_engine(engines.DEMO_ONNX) as engine:
        assert (engine.spec.height, engine.spec.width, engine.spec.max_batch) == (512, 512, 8)
        masks = infer(engine, np.stack([img for img, _ in pairs]))
    score = mean_dice(masks, np.stack([m for _, m in pairs]))
    assert score >= 0.85, score
