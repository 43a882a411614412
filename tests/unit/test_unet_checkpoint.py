"""The U-Net, synthetic data, Dice, checkpoint files, a training smoke run and the `engines` CLI's errors.

Real torch on tiny models (width 8, 64 px); no ONNX export and no engine (tests/integration/test_engines.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from common.metrics import dice, mean_dice
from engines.base import EngineError, EngineSpec
from engines.checkpoint import FORMAT, load_checkpoint, load_model, save_checkpoint
from engines.unet import UNet, UNetConfig
from toolchain.synth import generate, read_mask, write_dataset

SIZE = 64
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
