"""Engines: U-Net, synthetic data, checkpoints, ONNX export, ONNX Runtime and torch engines, loader.

Real torch and onnxruntime on tiny models (width 8, 64 px); the shipped demo model at 512 px.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import engines
from common.metrics import dice, mean_dice
from engines.base import EngineError, EngineSpec, Normalization, check_batch, infer, metadata_path
from engines.checkpoint import FORMAT, load_checkpoint, load_model, save_checkpoint
from engines.loader import load_engine, read_spec
from engines.onnx_engine import OnnxEngine
from engines.torch_engine import TorchEngine
from engines.unet import UNet, UNetConfig
from tests.conftest import tiny_checkpoint, tiny_unet
from toolchain.export import export_onnx
from toolchain.synth import generate, read_mask, write_dataset

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


# -- U-Net ---------------------------------------------------------------------------------------


def test_unet_output_shape() -> None:
    model = UNet(UNetConfig(width=8)).eval()
    with torch.inference_mode():
        out = model(torch.zeros(2, 1, 64, 96))
    assert out.shape == (2, 2, 64, 96)


@pytest.mark.parametrize("shape", [(60, 64), (64, 72), (8, 8)])
def test_unet_rejects_sizes_not_multiple_of_16(shape) -> None:
    model = UNet(UNetConfig(width=8)).eval()
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.zeros(1, 1, *shape))


def test_unet_config_round_trip() -> None:
    cfg = UNetConfig(width=8, in_channels=1, classes=2)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


# -- synthetic data ------------------------------------------------------------------------------


def test_synth_is_deterministic_and_prefix_stable() -> None:
    a = list(generate(3, 64, seed=11))
    b = list(generate(5, 64, seed=11))
    for (ia, ma), (ib, mb) in zip(a, b, strict=False):  # b's first 3 are a's 3
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    c = list(generate(3, 64, seed=12))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


def test_synth_masks_are_sane() -> None:
    pairs = list(generate(8, 128, seed=5))
    for image, mask in pairs:
        assert image.dtype == np.uint8 and image.shape == (128, 128)
        assert mask.dtype == np.uint8 and mask.shape == (128, 128)
        assert set(np.unique(mask)) <= {0, 1}
    fractions = [m.mean() for _, m in pairs]
    assert 0.05 < np.mean(fractions) < 0.5
    # cells are brighter than background on average, and images differ from each other
    contrast = [img[m == 1].mean() - img[m == 0].mean() for img, m in pairs if 0 < m.mean() < 1]
    assert np.mean(contrast) > 10
    assert len({float(img.mean()) for img, _ in pairs}) == len(pairs)
    assert min(float(img.std()) for img, _ in pairs) > 3


def test_write_dataset_round_trip(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "ds", 2, 64, seed=4, progress=False)
    pairs = list(generate(2, 64, seed=4))
    from PIL import Image

    for i, (image, mask) in enumerate(pairs):
        name = f"img_{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(out / "images" / name)), image)
        raw = np.asarray(Image.open(out / "truth" / name))
        assert set(np.unique(raw)) <= {0, 255}
        assert np.array_equal(read_mask(out / "truth" / name), mask)


# -- metrics -------------------------------------------------------------------------------------


def test_dice_known_cases() -> None:
    a = np.array([[1, 1, 0, 0]], np.uint8)
    assert dice(a, a) == 1.0
    assert dice(a, 1 - a) == 0.0
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert dice(np.zeros((1, 4)), a) == 0.0
    assert dice(np.array([[1, 0, 1, 0]]), a) == pytest.approx(0.5)
    assert mean_dice(np.stack([a, a]), np.stack([a, 1 - a])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


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


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(EngineError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    with pytest.raises(EngineError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "something/9", "state_dict": {}}, wrong)
    with pytest.raises(EngineError, match="wrong.pt.*segqueue-unet/1"):
        load_checkpoint(wrong)


class _Payload:  # an arbitrary object: weights_only loading must refuse to unpickle it
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "config": {}, "state_dict": {}, "spec": {}, "x": _Payload()}, evil)
    with pytest.raises(EngineError, match="evil.pt"):
        load_checkpoint(evil)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"format": FORMAT}))
    with pytest.raises(EngineError, match="plain.pt"):
        load_checkpoint(plain)


def test_checkpoint_with_mismatched_weights(tmp_path: Path) -> None:
    model = UNet(UNetConfig(width=8))
    path = save_checkpoint(tmp_path / "m.pt", model, EngineSpec())
    data = torch.load(path, weights_only=True)
    data["config"]["width"] = 16
    torch.save(data, path)
    with pytest.raises(EngineError, match="m.pt.*do not match"):
        load_model(path)


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


def test_train_smoke(tmp_path: Path) -> None:
    from toolchain.train import TrainConfig, train

    cfg = TrainConfig(
        out=tmp_path / "t.pt", width=8, size=64, crop=32, steps=3, batch=2, pool=2, eval_n=2,
        max_batch=2, progress=False, command="engines train --test",
    )
    result = train(cfg)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.training["command"] == "engines train --test"
    assert 0.0 <= ckpt.training["heldout_dice"] <= 1.0
    assert ckpt.training["eval_seed"] != cfg.seed
    assert (ckpt.spec.height, ckpt.spec.max_batch) == (64, 2)


def test_cli_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from toolchain.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["info", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2
    assert "missing.onnx" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "missing.pt" in result.output


def test_cli_info(tiny) -> None:
    from typer.testing import CliRunner

    from toolchain.cli import app

    result = CliRunner().invoke(app, ["info", str(tiny["onnx"])])
    assert result.exit_code == 0, result.output
    assert "1..4" in result.output and "onnxruntime=" in result.output


# -- the shipped demo model ----------------------------------------------------------------------


def test_demo_engine_segments_synthetic_images() -> None:
    assert engines.DEMO_ONNX.is_file(), f"demo model missing: {engines.DEMO_ONNX}"
    pairs = list(generate(4, 512, seed=424242))
    with load_engine(engines.DEMO_ONNX) as engine:
        assert (engine.spec.height, engine.spec.width, engine.spec.max_batch) == (512, 512, 8)
        masks = infer(engine, np.stack([img for img, _ in pairs]))
    score = mean_dice(masks, np.stack([m for _, m in pairs]))
    assert score >= 0.85, score
