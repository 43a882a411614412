"""The cuDNN INT8 engine's pure parts (engines.int8_plan, toolchain.cudnn_build): quantization, the input
table, the epilogue, the argmax, the file format on a hand-built plan, the per-layer precision choice.

No ONNX export, no engine: tests/integration/test_cudnn_int8.py reads a real quantized U-Net.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engines.base import EngineError, EngineSpec, Normalization
from engines.int8_plan import (
    FORMAT,
    Int8Plan,
    Layer,
    QTensor,
    first_argmax,
    load_plan,
    quantize,
    save_plan,
)
from toolchain.cudnn_build import choose_precision


def _plan(normalization: Normalization = Normalization(), input_scale: float = 1 / 127) -> Int8Plan:
    """A two-layer plan by hand: a 3x3 conv 1 -> 2 channels with ReLU, then a 2x2 upconv 2 -> 2."""
    rng = np.random.default_rng(0)
    tensors = {
        "x": QTensor("x", input_scale, 1, 1),
        "c": QTensor("c", 0.05, 2, 1),
        "u": QTensor("u", 0.1, 2, 1),
    }
    conv = Layer("conv", "conv", ["x"], "c", kernel=3, relu=True,
                 weight=rng.integers(-127, 128, (2, 1, 3, 3)).astype(np.int8),
                 weight_scale=np.array([0.01, 0.02], np.float32), bias=np.array([0.5, -0.25], np.float32))
    up = Layer("up", "upconv", ["c"], "u", kernel=2,
               weight=rng.integers(-127, 128, (2, 2, 2, 2)).astype(np.int8),
               weight_scale=np.array([0.03, 0.04], np.float32), bias=np.array([0.0, 1.0], np.float32),
               precision="fp16", timings_ms={"int8": 0.2, "fp16": 0.1})
    spec = EngineSpec(height=16, width=16, precision="int8", normalization=normalization)
    return Int8Plan(spec, "x", "u", tensors, [conv, up], batch_sizes=(1, 2))


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    got = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0, 3.4], np.float32), -128)
    assert got.tolist() == [0, 2, 2, 0, -2, 127, -128, 3]
    assert quantize(np.array([-3.0, 4.0]), 0).tolist() == [0, 4]


@pytest.mark.parametrize("content, message", [
    (b"not a zip", "not a cuDNN INT8 engine file"),
    (None, "format"),
])
def test_bad_files_are_refused_with_the_file_named(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.cudnn"
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("plan.json", json.dumps({"format": "something-else/9"}))
    else:
        path.write_bytes(content)
    with pytest.raises(EngineError, match=message) as info:
        load_plan(path)
    assert str(path) in str(info.value)


def test_precision_choice_takes_the_faster_and_int8_on_ties() -> None:
    assert choose_precision({"int8": 0.40, "fp16": 0.37}) == "fp16"
    assert choose_precision({"int8": 0.20, "fp16": 0.50}) == "int8"
    assert choose_precision({"int8": 0.30, "fp16": 0.30}) == "int8"
    assert choose_precision({"fp16": 0.30}) == "fp16"


def test_input_table_is_normalize_then_quantize_for_every_pixel_value() -> None:
    plan = _plan(Normalization(scale=1 / 255, mean=0.5, std=0.25), input_scale=4 / 127)
    table = plan.input_table()
    assert table.dtype == np.int8 and table.shape == (256,)
    # pixel 0 -> -2.0 / (4/127) = -63.5 -> -64 (half to even); 255 -> 2.0 -> 63.5 -> 64; 128 -> ~0.0078 -> 0
    assert (int(table[0]), int(table[128]), int(table[255])) == (-64, 0, 64)
    assert np.all(np.diff(table.astype(int)) >= 0)  # monotone in the pixel value


def test_input_table_saturates_at_both_ends() -> None:
    table = _plan(Normalization(scale=1.0, mean=128.0, std=1.0), input_scale=1.0).input_table()
    assert int(table[0]) == -128 and int(table[255]) == 127 and int(table[128]) == 0


def test_conv_epilogue_is_per_output_channel_scale_and_bias() -> None:
    plan = _plan(input_scale=0.5)
    scale, bias = plan.epilogue(plan.layers[0])
    assert scale.dtype == np.float32 and bias.dtype == np.float32
    np.testing.assert_allclose(scale, [0.5 * 0.01 / 0.05, 0.5 * 0.02 / 0.05], rtol=1e-6)
    np.testing.assert_allclose(bias, [0.5 / 0.05, -0.25 / 0.05], rtol=1e-6)


def test_upconv_epilogue_folds_the_weight_scales_into_the_weights() -> None:
    plan = _plan()
    up = plan.layers[1]
    scale, bias = plan.epilogue(up)
    np.testing.assert_allclose(scale, [0.05 / 0.1] * 2, rtol=1e-6)
    np.testing.assert_allclose(bias, [0.0, 10.0], rtol=1e-6)
    weight = plan.upconv_weight(up)
    assert weight.dtype == np.float16 and weight.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(weight[1], up.weight[1].astype(np.float32) * 0.04, rtol=1e-3)


def test_first_argmax_takes_the_first_class_on_ties() -> None:
    logits = np.array([[[[1.0, 2.0]], [[1.0, 1.0]], [[0.0, 2.0]]]], np.float32)  # (1, 3, 1, 2)
    got = first_argmax(logits)
    assert got.dtype == np.uint8 and got.shape == (1, 1, 2)
    assert got.tolist() == [[[0, 0]]]
    assert first_argmax(np.array([[[[0.0]], [[3.0]]]])).tolist() == [[[1]]]


def test_a_hand_built_plan_round_trips_through_its_file(tmp_path: Path) -> None:
    plan = _plan()
    path = save_plan(plan, tmp_path / "hand.cudnn", {"cudnn": "9.x"})
    with zipfile.ZipFile(path) as archive:
        doc = json.loads(archive.read("plan.json"))
        assert doc["format"] == FORMAT
        assert sorted(archive.namelist()) == ["layers/0/bias.npy", "layers/0/weight.npy", "layers/0/weight_scale.npy",
                                              "layers/1/bias.npy", "layers/1/weight.npy", "layers/1/weight_scale.npy",
                                              "plan.json"]
    loaded, built_with = load_plan(path)
    assert built_with == {"cudnn": "9.x"}
    assert loaded.spec == plan.spec and loaded.tensors == plan.tensors and loaded.batch_sizes == (1, 2)
    for got, want in zip(loaded.layers, plan.layers, strict=True):
        assert got.describe() == want.describe()
        for key in ("weight", "weight_scale", "bias"):
            assert np.array_equal(getattr(got, key), getattr(want, key))
            assert getattr(got, key).dtype == getattr(want, key).dtype
    assert np.array_equal(loaded.input_table(), plan.input_table())
