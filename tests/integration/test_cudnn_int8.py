"""The cuDNN INT8 engine: its ONNX import, CPU reference, file format and per-layer choice (CPU), and the
engine itself against the reference (GPU, marked `gpu`, skipped without CUDA and nvidia-cudnn-frontend).

The reference (`engines.int8_plan.reference_masks`) computes the same INT8 arithmetic in float64 on the
CPU; it checks the GPU kernels, it does not stand in for them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines import DEMO_CHECKPOINT
from engines.base import EngineError, infer
from engines.checkpoint import load_model
from engines.int8_plan import load_plan, plan_from_onnx, read_plan_document, reference_masks, save_plan
from engines.onnx_engine import OnnxEngine
from tests.conftest import SMALL_SIZE, tiny_unet
from toolchain.export import export_onnx
from toolchain.int8 import quantize_int8
from toolchain.synth import generate, write_dataset

WIDTH = 16  # INT8 convs need channels in multiples of 16


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained width-16 demo U-Net (BatchNorm in every block), exported at 64 px and quantized (MinMax on
    synthetic images of another seed than the test images)."""
    folder = tmp_path_factory.mktemp("int8")
    fp32 = folder / "unet.onnx"
    export_onnx(load_model(DEMO_CHECKPOINT)[0], fp32, height=SMALL_SIZE, width=SMALL_SIZE, max_batch=8)
    calib = write_dataset(folder / "calib", 16, size=SMALL_SIZE, seed=11, progress=False)
    quantize_int8(fp32, folder / "unet_int8.onnx", calib / "images", count=16)
    return folder / "unet_int8.onnx"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Eight held-out synthetic images, uint8 (8, 64, 64)."""
    return np.stack([image for image, _ in generate(8, size=SMALL_SIZE, seed=99)])


def test_plan_reads_every_layer_of_the_unet(int8_onnx: Path) -> None:
    plan = plan_from_onnx(int8_onnx)
    kinds = [layer.kind for layer in plan.layers]
    assert kinds.count("conv") == 19 and kinds.count("pool") == 4
    assert kinds.count("upconv") == 4 and kinds.count("concat") == 4
    convs = [layer for layer in plan.layers if layer.kind == "conv"]
    assert all(layer.relu for layer in convs[:-1]) and not convs[-1].relu  # the head has no ReLU
    assert convs[-1].kernel == 1 and plan.tensor(plan.logits).channels == 2
    assert all(layer.weight is not None and layer.weight.dtype == np.int8 for layer in convs)
    # the file's INT8 weights are taken as they are, not requantized
    model = onnx.load(str(int8_onnx))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(convs[0].weight, stored["inc.0.weight_quantized"])


def test_reference_agrees_with_onnx_runtime_on_the_same_int8_file(int8_onnx: Path, images: np.ndarray) -> None:
    plan = plan_from_onnx(int8_onnx)
    with OnnxEngine(int8_onnx) as engine:
        onnx_masks = infer(engine, images)
    ours = reference_masks(plan, images)
    agreement = float(np.mean(ours == onnx_masks))
    assert agreement >= 0.995, agreement
    assert len(np.unique(onnx_masks)) == 2  # both classes occur: agreement on a constant mask would prove nothing


def test_batchnorm_is_folded_into_the_int8_convs(tmp_path: Path, images: np.ndarray) -> None:
    """The same weights with and without BatchNorm statistics give different plans and masks."""
    plans = []
    for bn in (False, True):
        fp32 = tmp_path / f"u{bn}.onnx"
        export_onnx(tiny_unet(width=WIDTH, seed=3, bn_stats=bn), fp32, height=SMALL_SIZE, width=SMALL_SIZE)
        quantize_int8(fp32, tmp_path / f"u{bn}_int8.onnx", None, count=4)
        plans.append(plan_from_onnx(tmp_path / f"u{bn}_int8.onnx"))
    assert not any(layer.kind == "batchnorm" for layer in plans[1].layers)
    assert not np.array_equal(plans[0].layers[0].bias, plans[1].layers[0].bias)


def test_input_table_quantizes_normalized_pixels(int8_onnx: Path) -> None:
    plan = plan_from_onnx(int8_onnx)
    table = plan.input_table()
    scale = plan.tensor(plan.input_tensor).scale
    assert table.dtype == np.int8 and table.shape == (256,)
    assert table[0] == 0 and table[255] == np.rint(1.0 / scale)
    assert np.all(np.diff(table.astype(int)) >= 0)


def test_file_round_trip_holds_no_pickle(int8_onnx: Path, tmp_path: Path, images: np.ndarray) -> None:
    plan = plan_from_onnx(int8_onnx)
    plan.layers[1].precision = "fp16"
    plan.layers[1].timings_ms = {"int8": 0.5, "fp16": 0.4}
    plan.layers[1].plans = {"8": {"engine": 3, "knobs": {"12": 1}, "name": "x"}}
    path = save_plan(plan, tmp_path / "u.cudnn", {"gpu": "NVIDIA H100 80GB HBM3", "cudnn_major": "9"})
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert all(n == "plan.json" or n.endswith(".npy") for n in names)
        for name in names:
            if name.endswith(".npy"):  # every array loads without pickle
                import io

                np.load(io.BytesIO(archive.read(name)), allow_pickle=False)
    loaded, built = load_plan(path)
    assert built["gpu"] == "NVIDIA H100 80GB HBM3"
    assert loaded.layers[1].precision == "fp16" and loaded.layers[1].plans["8"]["engine"] == 3
    assert np.array_equal(reference_masks(loaded, images[:2]), reference_masks(plan, images[:2]))
    doc = read_plan_document(path)
    assert doc["layers"][1]["timings_ms"] == {"int8": 0.5, "fp16": 0.4}


def test_fp32_onnx_is_refused(tmp_path: Path) -> None:
    fp32 = tmp_path / "u.onnx"
    export_onnx(tiny_unet(width=WIDTH), fp32, height=SMALL_SIZE, width=SMALL_SIZE)
    with pytest.raises(EngineError, match="fp32 ONNX; build the INT8 Q/DQ file first"):
        plan_from_onnx(fp32)


def test_foreign_node_is_refused_by_name(int8_onnx: Path, tmp_path: Path) -> None:
    """A graph with an operator the U-Net does not have is refused, naming that node."""
    model = onnx.load(str(int8_onnx))
    graph = model.graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    sigmoid = onnx.helper.make_node("Sigmoid", list(relu.input), list(relu.output), name="my_sigmoid")
    index = list(graph.node).index(relu)
    graph.node.remove(relu)
    graph.node.insert(index, sigmoid)
    bad = tmp_path / "bad_int8.onnx"
    onnx.save(model, str(bad))
    (tmp_path / "bad_int8.onnx.json").write_text(Path(str(int8_onnx) + ".json").read_text())
    with pytest.raises(EngineError, match="node 'my_sigmoid' \\(Sigmoid\\): operator not supported") as info:
        plan_from_onnx(bad)
    assert str(bad) in str(info.value)


def test_cpu_layout_is_refused(int8_onnx: Path, tmp_path: Path) -> None:
    """The ONNX Runtime CPU layout (uint8 activations, zero points) is not the portable Q/DQ layout."""
    source = int8_onnx.parent / "unet.onnx"
    quantize_int8(source, tmp_path / "cpu_int8.onnx", None, count=2, target="cpu")
    with pytest.raises(EngineError, match="zero points must be int8 zeros|not supported"):
        plan_from_onnx(tmp_path / "cpu_int8.onnx")


class _CpuConv:
    """The arithmetic one cuDNN conv graph is built to do (conv, * S + B, ReLU, round, saturate to INT8), in
    float64 on the CPU. It checks the engine's own code around the graphs (input table, channel padding,
    upconv GEMM scatter, concat, requantization, pooling, argmax) on a CPU; the graphs themselves are
    checked on the GPU below."""

    def __init__(self, weights, kernel: int, relu: bool) -> None:
        self.weights, self.kernel, self.relu = weights, kernel, relu

    def run(self, handle, x, y, workspace) -> None:
        import torch

        w = self.weights
        acc = torch.nn.functional.conv2d(x.double(), w.weight.double(), padding=self.kernel // 2)
        v = acc * w.scale.double() + w.bias.double()
        if self.relu:
            v = v.clamp(min=0)
        y.copy_(torch.clamp(torch.round(v), -128, 127))


@pytest.mark.parametrize(("first_precision", "glue"), [("int8", "torch"), ("fp16", "torch"), ("int8", "triton")])
def test_engine_glue_around_the_cudnn_graphs_matches_the_reference(int8_onnx: Path, images: np.ndarray,
                                                                   first_precision: str, glue: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """glue "triton": the engine's Triton kernels in Triton's interpreter (tests/unit/test_int8_glue.py)."""
    import torch

    from engines.cudnn_int8 import PlanRunner, layer_weights
    from engines.int8_glue import interpreter_unsafe, triton_unavailable

    if glue == "triton":
        if triton_unavailable() or interpreter_unsafe():
            pytest.skip(triton_unavailable() or interpreter_unsafe())
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    plan = plan_from_onnx(int8_onnx)
    plan.layers[0].precision = first_precision  # int8: 1 input channel padded to 16; fp16: widened, padded to 8
    runner = PlanRunner(plan, torch.device("cpu"), cudnn=None, glue=glue)
    assert runner.glue.name == glue
    assert runner.skip_copied_by_pool, "every skip of the U-Net is pooled first: its copy rides with the pool"
    runner.weights[plan.layers[0].name] = layer_weights(plan, plan.layers[0], first_precision, runner.device)
    bufs = runner.allocate(8)
    for layer in plan.layers:
        if layer.kind in ("conv", "upconv"):
            kernel = 1 if layer.kind == "upconv" else layer.kernel
            runner.graphs[(layer.name, 8)] = _CpuConv(runner.weights[layer.name], kernel, layer.relu)  # type: ignore
    bufs.pixels.copy_(torch.from_numpy(images))
    masks = runner.forward(bufs, 8, handle=None).numpy()
    reference = reference_masks(plan, images)
    assert len(np.unique(reference)) == 2
    assert float(np.mean(masks == reference)) >= 0.999


# --- on the GPU ----------------------------------------------------------------------------------------


def _gpu_ready() -> str:
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device"
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return "needs nvidia-cudnn-frontend"
    return ""


gpu = pytest.mark.skipif(bool(_gpu_ready()), reason=_gpu_ready() or "ok")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("glue", ["torch", "triton"])
def test_gpu_engine_matches_the_reference(int8_onnx: Path, tmp_path: Path, images: np.ndarray, glue: str) -> None:
    from engines.cudnn_int8 import CudnnInt8Engine
    from toolchain.cudnn_build import build_cudnn_int8

    path = tmp_path / "u.cudnn"
    plan = build_cudnn_int8(int8_onnx, path, batch_sizes=(1, 4, 8), progress=lambda _: None)
    assert all(layer.plans.keys() == {"1", "4", "8"} for layer in plan.layers if layer.kind in ("conv", "upconv"))
    reference = reference_masks(plan, images)
    with CudnnInt8Engine(path, glue=glue) as engine:
        assert engine.glue_name == glue
        masks = infer(engine, images)
        for n in (1, 3, 5):  # padded batches give the same masks as full ones
            assert np.array_equal(infer(engine, images[:n]), masks[:n])
        flights = [engine.submit(images[i:i + 2]) for i in range(0, 8, 2)]  # both slots in flight
        assert np.array_equal(np.concatenate([f.result() for f in flights]), masks)
    agreement = float(np.mean(masks == reference))
    assert agreement >= 0.999, agreement
    with OnnxEngine(int8_onnx) as onnx_engine:
        assert float(np.mean(masks == infer(onnx_engine, images))) >= 0.995
