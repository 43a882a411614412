"""INT8 ONNX (`quantize_int8`): explicit quantization (Q/DQ), one artifact for every runtime.

1. BatchNorm is folded into the preceding convolution (the dynamo exporter already does this;
   any BatchNormalization node left is folded here, and the count is recorded).
2. onnxruntime's quantization pre-processing (`quant_pre_process`: symbolic shape inference,
   ONNX Runtime's basic graph optimizations, ONNX shape inference).
3. Calibration: the FP32 model runs on calibration images and each activation's range is
   recorded. MinMax (default: the range seen; the seed study found entropy calibration wrong),
   entropy or percentile (99.999 %) for comparison. Images come from a folder, decoded exactly
   as the producer decodes them (`common.images.decode_image` at the engine's size) and
   normalized as the engine normalizes them; `count` of them, spread evenly over the sorted
   file list.
4. `onnxruntime.quantization.quantize_static` writes QuantizeLinear/DequantizeLinear (Q/DQ)
   nodes with those ranges, weights stored as INT8 initializers.

target="tensorrt" (default, portable): activations INT8 symmetric (zero point 0), weights INT8
symmetric per channel (ConvTranspose weights per *input* channel, axis 0, the only per-channel
layout TensorRT's deconvolution kernels support), biases left float (TensorRT refuses an INT32
DequantizeLinear; it folds the float bias itself). TensorRT 10 and 11 and ONNX Runtime (CPU
and GPU) all accept it. On ONNX Runtime's CPU path it is *not* faster than FP32: with a zero
point of 0, Relu does not disappear into the quantized range, so ONNX Runtime runs every Relu,
Concat and MaxPool in float between extra Dequantize/Quantize passes (benchmarks/cpu_precisions.py
measures both layouts against FP32).

target="cpu": activations UINT8 asymmetric, weights INT8 per channel, biases INT32: ONNX
Runtime's fast CPU form (Relu folded into the quantized range, QLinearConv, QLinearConcat,
NHWC MaxPool). TensorRT refuses it (UINT8, non-zero zero points, INT32 bias):
`tensorrt_incompatibilities()` lists why, and `engines build` checks it before building a plan.

calib=None ("no calibration", the seed study's uncalibrated INT8 row): there is no such thing
as INT8 without ranges, so here it means *data-free* ranges: the same pipeline calibrated on
`count` images of uniform random noise (pixels 0..255, seed NOISE_SEED) instead of real
images. The input range is right, but every internal activation range is that of noise, not
of cells: what skipping calibration on real data costs.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from engines.base import EngineError, EngineSpec, metadata_path
from engines.versions import built_with
from toolchain.onnx_checks import check_onnx, op_counts
from toolchain.onnx_precision import (
    CHECK_IMAGES,
    PrecisionResult,
    batch_for,
    carried_keys,
    compare_with_source,
    quiet,
    source_spec,
)

CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("tensorrt", "cpu")
DEFAULT_CALIB_COUNT = 64
#: seed of the uniform-noise images used by calib=None (data-free ranges)
NOISE_SEED = 20261121


def check_int8_options(method: str, target: str) -> None:
    """EngineError unless `method` is one of CALIB_METHODS and `target` one of INT8_TARGETS."""
    if method not in CALIB_METHODS:
        raise EngineError(f"unknown calibration method {method!r} (use {', '.join(CALIB_METHODS)})")
    if target not in INT8_TARGETS:
        raise EngineError(f"unknown INT8 target {target!r} (use {', '.join(INT8_TARGETS)})")


def fold_batchnorm_onnx(model) -> int:
    """Fold BatchNormalization nodes into the Conv/ConvTranspose that feeds them, in place.

    A BatchNormalization (inference form, constant parameters) whose input is produced by a Conv
    (or a group-1 ConvTranspose) with constant weights and no other consumer becomes part of that
    convolution: W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), per
    output channel. Returns how many were folded; others are left as they are.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = Counter(name for node in graph.node for name in node.input)
    consumers.update(o.name for o in graph.output)

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]).astype(np.float64) if name in inits else None

    folded, remove = 0, []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or consumers[bn.input[0]] != 1:
            continue
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if conv.op_type == "ConvTranspose" and group != 1:
            continue
        params = [const(name) for name in bn.input[1:]]
        weight = const(conv.input[1])
        gamma, beta, mean, var = params
        if weight is None or gamma is None or beta is None or mean is None or var is None:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        axis = 0 if conv.op_type == "Conv" else 1
        shape = [1] * weight.ndim
        shape[axis] = -1
        new_weight = weight * scale.reshape(shape)
        bias = const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(mean)
        if bias is None:
            continue
        new_bias = (bias - mean) * scale + beta
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype
        w_name = f"{conv.input[1]}_bnfolded"
        b_name = f"{conv.name or conv.output[0]}_bias_bnfolded"
        graph.initializer.append(numpy_helper.from_array(new_weight.astype(dtype), w_name))
        graph.initializer.append(numpy_helper.from_array(new_bias.astype(dtype), b_name))
        inputs = [conv.input[0], w_name, b_name]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = bn.output[0]
        remove.append(bn)
        folded += 1
    for node in remove:
        graph.node.remove(node)
    if folded:
        used = {name for node in graph.node for name in node.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return folded


def tensorrt_incompatibilities(path: Path | str) -> list[str]:
    """Why TensorRT would refuse this Q/DQ ONNX file (empty list: nothing found).

    TensorRT wants INT8 Q/DQ with zero point 0 and DequantizeLinear only on INT8 data (no UINT8,
    no INT32 bias). Checks the initializers that feed QuantizeLinear/DequantizeLinear nodes.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    problems: Counter = Counter()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            kind = inits[node.input[0]].data_type
            if kind == TensorProto.INT32:
                problems["INT32 DequantizeLinear (quantized bias)"] += 1
            elif kind == TensorProto.UINT8:
                problems["UINT8 DequantizeLinear input"] += 1
        if len(node.input) > 2 and node.input[2] in inits:
            zp = inits[node.input[2]]
            if zp.data_type == TensorProto.UINT8:
                problems[f"UINT8 {node.op_type} (asymmetric activations)"] += 1
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems[f"{node.op_type} with a non-zero zero point"] += 1
    return [f"{count} x {what}" for what, count in problems.items()]


def calibration_files(folder: Path | str, count: int) -> list[Path]:
    """The image files of `folder` (recursive, sorted) used for calibration: at most `count`, spread evenly.

    EngineError naming the folder if it is missing, not a folder, or holds no supported image.
    """
    from common.images import find_images

    folder = Path(folder)
    if count < 1:
        raise EngineError(f"calibration image count must be >= 1, got {count}")
    if not folder.exists():
        raise EngineError(f"{folder}: calibration folder not found")
    if not folder.is_dir():
        raise EngineError(f"{folder}: --calib must be a folder of images (or 'none'), this is a file")
    sources, _errors = find_images([folder])
    if not sources:
        raise EngineError(f"{folder}: calibration folder holds no images (.png, .jpg, .tif, .bmp)")
    if len(sources) > count:
        picks = np.unique(np.linspace(0, len(sources) - 1, count).round().astype(int))
        sources = [sources[i] for i in picks]
    return [src.path for src in sources]


def calibration_images(folder: Path | str, height: int, width: int, count: int) -> tuple[np.ndarray, list[str]]:
    """Decode up to `count` images of `folder` (see `calibration_files`) as the producer does, at height x width.

    Returns (uint8 (N, height, width), skipped) where skipped lists "path: reason" for files that
    could not be decoded. EngineError (naming the folder) if no image can be decoded.
    """
    from common.images import ImageError, decode_image

    files = calibration_files(folder, count)
    images, skipped = [], []
    for path in files:
        try:
            images.append(decode_image(path, height, width).pixels)
        except ImageError as exc:
            skipped.append(str(exc))
    if not images:
        raise EngineError(f"{folder}: none of its {len(files)} images could be decoded (first: {skipped[0]})")
    return np.stack(images), skipped


def noise_images(count: int, height: int, width: int, seed: int = NOISE_SEED) -> np.ndarray:
    """`count` uint8 (count, height, width) images of uniform random pixels 0..255 (data-free calibration)."""
    if count < 1:
        raise EngineError(f"calibration image count must be >= 1, got {count}")
    return np.random.default_rng(seed).integers(0, 256, (count, height, width), dtype=np.uint8)


class CalibrationReader:
    """onnxruntime CalibrationDataReader over normalized batches; supports set_range for strided collection."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._batches = batches
        self._name = input_name
        self._iter = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._name: batch}

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self._batches[start_index:end_index])


def calibration_batches(images: np.ndarray, spec: EngineSpec, batch: int) -> list[np.ndarray]:
    """Normalized float32 (batch, 1, H, W) arrays; the last one padded by repeating the first images."""
    from engines.onnx_engine import normalize_array

    x = normalize_array(images, spec.normalization)
    if len(x) % batch:
        x = np.concatenate([x, x[: batch - len(x) % batch]]) if len(x) >= batch else np.resize(x, (batch, *x.shape[1:]))
    return [np.ascontiguousarray(x[i : i + batch]) for i in range(0, len(x), batch)]


def quant_options(target: str, model) -> dict:
    """quantize_static keyword arguments for a target (see the module docstring).

    CalibStridedMinMax=1 makes the calibrator collect one batch at a time (the reader's set_range):
    MinMax merges ranges per batch (same result), the histogram methods merge histograms, so memory
    stays at one batch of activations instead of all of them.
    """
    from onnxruntime.quantization import QuantFormat, QuantType

    common = {"quant_format": QuantFormat.QDQ, "weight_type": QuantType.QInt8, "per_channel": True,
              "reduce_range": False}
    if target == "tensorrt":
        deconv_weights = {n.input[1] for n in model.graph.node if n.op_type == "ConvTranspose"}
        return {
            **common,
            "activation_type": QuantType.QInt8,
            "extra_options": {
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "QDQDisableWeightAdjustForInt32Bias": True,  # no INT32 bias to protect
                "TensorQuantOverrides": {name: [{"axis": 0}] for name in sorted(deconv_weights)},
                "CalibStridedMinMax": 1,
            },
        }
    return {
        **common,
        "activation_type": QuantType.QUInt8,
        "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True, "CalibStridedMinMax": 1},
    }


LAYOUTS = {
    "tensorrt": {
        "activations": "int8 symmetric (zero point 0)",
        "weights": "int8 symmetric per-channel (ConvTranspose per input channel)",
        "bias": "float",
    },
    "cpu": {"activations": "uint8 asymmetric", "weights": "int8 symmetric per-channel", "bias": "int32"},
}


def quantize_int8(
    source: Path | str,
    output: Path | str,
    calib: Path | str | None,
    method: str = "minmax",
    count: int = DEFAULT_CALIB_COUNT,
    target: str = "tensorrt",
) -> PrecisionResult:
    """Write an INT8 Q/DQ copy of the FP32 ONNX `source`, calibrated, and its metadata.

    calib: a folder of images, or None / "none" for data-free ranges from uniform noise (the
    "uncalibrated" row; see the module docstring). method: "minmax" (default), "entropy" or
    "percentile". count: calibration images used (at most; fewer if the folder has fewer).
    target: "tensorrt" (portable, default) or "cpu" (ONNX Runtime CPU only). Raises EngineError
    naming the file or folder on any failure.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, output = Path(source), Path(output)
    check_int8_options(method, target)
    spec = source_spec(source, output)
    data_free = calib is None or str(calib).lower() == "none"
    if data_free:
        images, skipped = noise_images(count, spec.height, spec.width), list[str]()
        origin = f"uniform noise 0..255, seed {NOISE_SEED}"
    else:
        images, skipped = calibration_images(Path(calib), spec.height, spec.width, count)  # type: ignore[arg-type]
        origin = Path(calib).resolve().name  # type: ignore[arg-type]

    model = onnx.load(str(source))
    bn_before = op_counts(model).get("BatchNormalization", 0)
    folded = fold_batchnorm_onnx(model) if bn_before else 0
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="engines-int8-") as tmp:
        staged = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(staged))
        ready = Path(tmp) / "preprocessed.onnx"
        try:
            with quiet():
                quant_pre_process(str(staged), str(ready))
        except Exception as exc:
            raise EngineError(f"{source}: quantization pre-processing failed ({str(exc)[:300]})") from None
        import onnxruntime as ort

        probe = ort.InferenceSession(str(ready), providers=["CPUExecutionProvider"])
        batches = calibration_batches(images, spec, batch_for(probe, spec))
        del probe
        options = quant_options(target, onnx.load(str(ready), load_external_data=False))
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            with quiet():
                quantize_static(str(ready), str(output), CalibrationReader(batches, spec.input_name),
                                calibrate_method=methods[method], **options)
        except Exception as exc:
            raise EngineError(f"{output}: quantization failed ({type(exc).__name__}: {str(exc)[:300]})") from None

    quantized = onnx.load(str(output))
    check_onnx(quantized, output, "quantized")
    ops = op_counts(quantized)
    if not ops.get("QuantizeLinear") or not ops.get("DequantizeLinear"):
        raise EngineError(f"{output}: quantization wrote no QuantizeLinear/DequantizeLinear nodes (ops: {ops})")
    diff, agreement = compare_with_source(source, output, spec)
    layout = LAYOUTS[target]
    final = replace(
        spec,
        precision="int8",
        built_with=built_with(
            "cpu", **carried_keys(spec), source=source.name,
            calibration="none (data-free: uniform noise images)" if data_free else method,
            calibration_method=method,
            calibration_images=str(len(images)),
            calibration_source=origin,
            calibration_skipped=str(len(skipped)),
            quantizer="onnxruntime.quantization.quantize_static",
            quant_format="QDQ",
            target=target,
            activations=layout["activations"],
            weights=layout["weights"],
            bias=layout["bias"],
            preprocess="quant_pre_process",
            batchnorm=(f"folded {folded} of {bn_before}" if bn_before else "none in graph (folded by the exporter)"),
            check=f"masks agree {agreement:.4%} with fp32 on {CHECK_IMAGES} synthetic images",
        ),
    )
    meta = metadata_path(output)
    meta.write_text(final.to_json() + "\n")
    return PrecisionResult(output, meta, final, ops, diff, agreement, tuple(skipped))
