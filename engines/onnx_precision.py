"""FP16 and INT8 (explicit Q/DQ) ONNX engines, built from an FP32 ONNX U-Net and its metadata.

FP16 (`convert_fp16`)
    Every weight and every internal activation becomes float16; the graph's input "image" and
    output "logits" stay float32 (`keep_io_types=True`): one Cast after the input and one before
    the output. So every runtime feeds the same normalized float32 batch and reads float32 logits,
    and the engine code (normalize, argmax) does not change with precision. It is the graph that
    TensorRT 11 (strongly typed: precision comes from the graph) builds as an FP16 engine. ONNX
    Runtime on an x86 CPU has no float16 convolution kernels: it runs the file by casting back to
    float32 (same speed as FP32, weights rounded to float16); the file is for GPU runtimes.

INT8 (`quantize_int8`): explicit quantization, one artifact for every runtime
    1. BatchNorm is folded into the preceding convolution (the dynamo exporter already does this;
       any BatchNormalization node left is folded here, and the count is recorded).
    2. onnxruntime's quantization pre-processing (`quant_pre_process`: symbolic shape inference,
       ONNX Runtime's basic graph optimizations, ONNX shape inference).
    3. Calibration: the FP32 model runs on calibration images and each activation's range is
       recorded. MinMax (default: the range seen; the seed study found entropy calibration wrong),
       entropy or percentile (99.999 %) for comparison. Images come from a folder, decoded exactly
       as the producer decodes them (`producer.images.decode_image` at the engine's size) and
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
    Concat and MaxPool in float between extra Dequantize/Quantize passes (demo model, 2 cores,
    batch 8: FP32 10.3 img/s, this layout 8.6, the "cpu" layout 15.6; benchmarks/cpu_precisions.py).

    target="cpu": activations UINT8 asymmetric, weights INT8 per channel, biases INT32: ONNX
    Runtime's fast CPU form (Relu folded into the quantized range, QLinearConv, QLinearConcat,
    NHWC MaxPool). TensorRT refuses it (UINT8, non-zero zero points, INT32 bias):
    `tensorrt_incompatibilities()` lists why, and `engines build` checks it before building a plan.

    calib=None ("no calibration", the seed study's uncalibrated INT8 row): there is no such thing
    as INT8 without ranges, so here it means *data-free* ranges: the same pipeline calibrated on
    `count` images of uniform random noise (pixels 0..255, seed NOISE_SEED) instead of real
    images. The input range is right, but every internal activation range is that of noise, not
    of cells: what skipping calibration on real data costs.

Metadata (`<file>.onnx.json`) is the source's EngineSpec with precision "fp16" or "int8" and, in
built_with, what was done: calibration method, number of images, their folder's name, quantization
layout, target, ONNX Runtime version, and a self-check against the FP32 source.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engines.base import EngineError, EngineSpec, metadata_path
from engines.onnx_checks import check_onnx, op_counts
from engines.versions import built_with

CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("tensorrt", "cpu")
DEFAULT_CALIB_COUNT = 64
#: seed of the uniform-noise images used by calib=None (data-free ranges)
NOISE_SEED = 20261121
#: images per calibration batch (histogram methods keep one batch of activations in memory)
CALIB_BATCH = 4
#: FP16 self-check: max |logit_fp16 - logit_fp32| allowed on the check images
FP16_TOLERANCE = 0.1
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


# -- graph utilities ------------------------------------------------------------------------------


def topological_sort(graph) -> None:
    """Reorder `graph.node` (an onnx GraphProto) so every node follows its inputs' producers.

    float16 conversion appends its Cast nodes at the end; onnx.checker and TensorRT require
    topological order. Raises EngineError on a cycle or an input no node produces.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in available})[:5]
            raise EngineError(f"graph cannot be ordered: inputs {missing} are never produced")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def fold_batchnorm(model) -> int:
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
        if weight is None or any(p is None for p in params):
            continue
        gamma, beta, mean, var = params
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


# -- sources and checks ---------------------------------------------------------------------------


def _source_spec(source: Path, output: Path) -> EngineSpec:
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
    from engines.synth import generate

    side = max(spec.height, spec.width)
    return np.stack([image[: spec.height, : spec.width] for image, _ in generate(n, side, seed)])


def onnx_logits(path: Path | str, spec: EngineSpec, images: np.ndarray) -> np.ndarray:
    """float32 logits (N, classes, H, W) of an ONNX file on uint8 images (N, H, W), ONNX Runtime CPU."""
    import onnxruntime as ort

    from engines.onnx_engine import normalize

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EngineError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip()[:300]})") from None
    batch = _batch_for(session, spec)
    x = normalize(images, spec.normalization)
    outs = [session.run(None, {spec.input_name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32)


def _batch_for(session, spec: EngineSpec) -> int:
    """Batch size to feed: the graph's fixed batch if it has one, else up to CALIB_BATCH."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else max(1, min(CALIB_BATCH, spec.max_batch))


def _compare(source: Path, output: Path, spec: EngineSpec) -> tuple[float, float]:
    """(max |logit difference|, mask agreement) of output vs source on the check images."""
    images = check_images(spec)
    ref = onnx_logits(source, spec, images)
    got = onnx_logits(output, spec, images)
    if got.shape != ref.shape:
        raise EngineError(f"{output}: output shape {got.shape} differs from the source's {ref.shape}")
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    return float(np.abs(got - ref).max()), agreement


def _write(model, output: Path) -> None:
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    check_onnx(model, output, "converted")
    onnx.save(model, str(output))


def _carry(spec: EngineSpec) -> dict[str, str]:
    """Keys of the source's built_with worth keeping (model identity)."""
    return {k: spec.built_with[k] for k in ("unet_width", "opset") if k in spec.built_with}


# -- FP16 -----------------------------------------------------------------------------------------


def _float16_converter():
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16, "onnxruntime.transformers.float16"
    except ImportError:  # pragma: no cover - onnxruntime without its transformers tools
        try:
            from onnxconverter_common.float16 import convert_float_to_float16
        except ImportError:
            raise EngineError(
                "FP16 conversion needs onnxruntime's transformers tools or onnxconverter-common "
                "(pip install onnxconverter-common)"
            ) from None
        return convert_float_to_float16, "onnxconverter_common.float16"


def convert_fp16(source: Path | str, output: Path | str) -> PrecisionResult:
    """Write an FP16 copy of the FP32 ONNX `source` (float32 input/output kept) and its metadata.

    Checks the result with onnx.checker and ONNX Runtime CPU: max |logit difference| to the source
    below FP16_TOLERANCE on synthetic images, else EngineError naming the file.
    """
    import onnx

    source, output = Path(source), Path(output)
    spec = _source_spec(source, output)
    convert, tool = _float16_converter()
    model = onnx.load(str(source))
    with _quiet():
        model16 = convert(model, keep_io_types=True)
    topological_sort(model16.graph)
    _write(model16, output)
    diff, agreement = _compare(source, output, spec)
    if not diff < FP16_TOLERANCE:
        output.unlink(missing_ok=True)
        raise EngineError(f"{output}: FP16 logits differ from FP32 by {diff:.3g} (limit {FP16_TOLERANCE})")
    final = replace(
        spec,
        precision="fp16",
        built_with=built_with(
            "cpu", **_carry(spec), source=source.name, converter=f"{tool}.convert_float_to_float16",
            io_types="float32 (keep_io_types=True)",
            check=f"max |logit - fp32| {diff:.3g}, masks agree {agreement:.4%} on {CHECK_IMAGES} synthetic images",
        ),
    )
    meta = metadata_path(output)
    meta.write_text(final.to_json() + "\n")
    return PrecisionResult(output, meta, final, op_counts(model16), diff, agreement)


# -- INT8 -----------------------------------------------------------------------------------------


def calibration_files(folder: Path | str, count: int) -> list[Path]:
    """The image files of `folder` (recursive, sorted) used for calibration: at most `count`, spread evenly.

    EngineError naming the folder if it is missing, not a folder, or holds no supported image.
    """
    from producer.images import find_images

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
    from producer.images import ImageError, decode_image

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


class _Reader:
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


def _calibration_batches(images: np.ndarray, spec: EngineSpec, batch: int) -> list[np.ndarray]:
    """Normalized float32 (batch, 1, H, W) arrays; the last one padded by repeating the first images."""
    from engines.onnx_engine import normalize

    x = normalize(images, spec.normalization)
    if len(x) % batch:
        x = np.concatenate([x, x[: batch - len(x) % batch]]) if len(x) >= batch else np.resize(x, (batch, *x.shape[1:]))
    return [np.ascontiguousarray(x[i : i + batch]) for i in range(0, len(x), batch)]


def _quant_options(target: str, model) -> dict:
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
    preprocess: bool = True,
    per_channel: bool = True,
) -> PrecisionResult:
    """Write an INT8 Q/DQ copy of the FP32 ONNX `source`, calibrated, and its metadata.

    calib: a folder of images, or None / "none" for data-free ranges from uniform noise (the
    "uncalibrated" row; see the module docstring). method: "minmax" (default), "entropy" or
    "percentile". count: calibration images used (at most; fewer if the folder has fewer).
    target: "tensorrt" (portable, default) or "cpu" (ONNX Runtime CPU only). preprocess: run
    `quant_pre_process` first (on by default; off only to measure what it does). per_channel:
    per-channel weight scales (default; off only for diagnosis). Raises
    EngineError naming the file or folder on any failure.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, output = Path(source), Path(output)
    if method not in CALIB_METHODS:
        raise EngineError(f"unknown calibration method {method!r} (use {', '.join(CALIB_METHODS)})")
    if target not in INT8_TARGETS:
        raise EngineError(f"unknown INT8 target {target!r} (use {', '.join(INT8_TARGETS)})")
    spec = _source_spec(source, output)
    data_free = calib is None or str(calib).lower() == "none"
    if data_free:
        images, skipped = noise_images(count, spec.height, spec.width), []
        origin = f"uniform noise 0..255, seed {NOISE_SEED}"
    else:
        images, skipped = calibration_images(Path(calib), spec.height, spec.width, count)  # type: ignore[arg-type]
        origin = Path(calib).resolve().name  # type: ignore[arg-type]

    model = onnx.load(str(source))
    bn_before = op_counts(model).get("BatchNormalization", 0)
    folded = fold_batchnorm(model) if bn_before else 0
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="engines-int8-") as tmp:
        staged = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(staged))
        ready = staged
        if preprocess:
            ready = Path(tmp) / "preprocessed.onnx"
            try:
                with _quiet():
                    quant_pre_process(str(staged), str(ready))
            except Exception as exc:
                raise EngineError(f"{source}: quantization pre-processing failed ({str(exc)[:300]})") from None
        import onnxruntime as ort

        probe = ort.InferenceSession(str(ready), providers=["CPUExecutionProvider"])
        batches = _calibration_batches(images, spec, _batch_for(probe, spec))
        del probe
        options = _quant_options(target, onnx.load(str(ready), load_external_data=False))
        if not per_channel:
            options["per_channel"] = False
            options["extra_options"].pop("TensorQuantOverrides", None)
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _quiet():
                quantize_static(str(ready), str(output), _Reader(batches, spec.input_name),
                                calibrate_method=methods[method], **options)
        except Exception as exc:
            raise EngineError(f"{output}: quantization failed ({type(exc).__name__}: {str(exc)[:300]})") from None

    quantized = onnx.load(str(output))
    check_onnx(quantized, output, "quantized")
    ops = op_counts(quantized)
    if not ops.get("QuantizeLinear") or not ops.get("DequantizeLinear"):
        raise EngineError(f"{output}: quantization wrote no QuantizeLinear/DequantizeLinear nodes (ops: {ops})")
    diff, agreement = _compare(source, output, spec)
    layout = LAYOUTS[target]
    final = replace(
        spec,
        precision="int8",
        built_with=built_with(
            "cpu", **_carry(spec), source=source.name,
            calibration="none (data-free: uniform noise images)" if data_free else method,
            calibration_method=method,
            calibration_images=str(len(images)),
            calibration_source=origin,
            calibration_skipped=str(len(skipped)),
            quantizer="onnxruntime.quantization.quantize_static",
            quant_format="QDQ",
            target=target,
            activations=layout["activations"],
            weights=layout["weights"] if per_channel else "int8 symmetric per-tensor",
            bias=layout["bias"],
            preprocess="quant_pre_process" if preprocess else "none",
            batchnorm=(f"folded {folded} of {bn_before}" if bn_before else "none in graph (folded by the exporter)"),
            check=f"masks agree {agreement:.4%} with fp32 on {CHECK_IMAGES} synthetic images",
        ),
    )
    meta = metadata_path(output)
    meta.write_text(final.to_json() + "\n")
    return PrecisionResult(output, meta, final, ops, diff, agreement, tuple(skipped))
