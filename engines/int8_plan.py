"""The INT8 U-Net as a list of quantized layers: read from the Q/DQ ONNX, run as a CPU reference, saved as a file.

One calibration for every runtime: `engines build --precision int8 --calib DIR` writes a Q/DQ ONNX
(INT8 weights per output channel, activation scales per tensor, zero points 0) that TensorRT and
ONNX Runtime run. `plan_from_onnx` reads that file into an `Int8Plan`: the same INT8 weights and
the same scales, as a short list of layers the cuDNN engine (engines/cudnn_int8.py) runs on the
GPU. Nothing is re-calibrated or re-quantized.

Layers (every activation between them is INT8, NHWC, with one scale per tensor):

    input    pixels (uint8) -> normalized -> quantized with the input scale (a 256-entry table)
    conv     3x3 (padding 1) or 1x1: acc = sum(x_q * w_q) exactly, then per output channel
             y_q = clamp(round_half_even(acc * S[c] + B[c]), lo, 127), S = s_x * s_w[c] / s_y,
             B = bias / s_y, lo = 0 after ReLU, else -128
    pool     2x2 max pool (same scale in and out: max commutes with quantization)
    upconv   2x2 stride-2 transposed conv; its weights are per *input* channel, so it runs in
             FP16 on dequantized weights (W = w_q * s_w[ci]), output quantized like a conv
    concat   skip and up-sampled tensor along channels; an input whose scale differs from the
             concat's is requantized: round_half_even(q * s_in / s_out)
    head     the 1x1 conv to class logits (quantized, as the ONNX graph quantizes them); the mask
             is the argmax over classes, the first class on ties

This matches ONNX Runtime's Q/DQ arithmetic except in two places, both within one quantization
step: the epilogue multiplies by S instead of dividing by s_y in float32, and an up-convolution
feeding a concat is quantized once, straight to the concat's scale (ONNX Runtime rounds to its own
scale, then requantizes).

`reference_masks` computes exactly this in float64 on the CPU: it is the check for the GPU engine
(same INT8 math, not a stand-in for it). `save_plan`/`load_plan` write and read the `.cudnn` file:
a zip of `.npy` arrays and one JSON document (no pickle), read with numpy's allow_pickle=False.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import EngineError, EngineSpec

FORMAT = "segqueue-cudnn-int8/1"
SUFFIX = ".cudnn"
PRECISIONS = ("int8", "fp16")


@dataclass(frozen=True)
class QTensor:
    """An INT8 activation: `channels` channels at 1/`downscale` of the input size, value = q * scale."""

    name: str
    scale: float
    channels: int
    downscale: int


@dataclass
class Layer:
    """One layer of the plan.

    kind: "conv" (kernel 3 or 1), "pool", "upconv" or "concat". sources: input tensor names (two for
    concat). output: the output tensor's name. weight: int8 (Cout, Cin, k, k) for conv, (Cin, Cout,
    2, 2) for upconv. weight_scale: float32 per output channel (conv) or per input channel (upconv).
    bias: float32 (Cout,). relu: clamp the output at 0. precision: "int8" or "fp16" (how the GPU
    runs it; chosen by timing at build). timings_ms: the build's measurements per precision, batch
    max. plans: per batch size, the cuDNN plan chosen at build ({"engine": id, "knobs": {...}}).
    """

    name: str
    kind: str
    sources: list[str]
    output: str
    kernel: int = 0
    relu: bool = False
    weight: np.ndarray | None = None
    weight_scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    precision: str = "int8"
    timings_ms: dict[str, float] = field(default_factory=dict)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The layer without its arrays (what the file's JSON and `engines info` hold)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("weight", "weight_scale", "bias")}
        if self.weight is not None:
            data["weight_shape"] = list(self.weight.shape)
        return data


@dataclass
class Int8Plan:
    """The quantized U-Net: input scale, tensors, layers in execution order, the head's output."""

    spec: EngineSpec
    input_tensor: str
    logits: str
    tensors: dict[str, QTensor]
    layers: list[Layer]
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)

    def tensor(self, name: str) -> QTensor:
        """The tensor called `name`."""
        return self.tensors[name]

    def input_table(self) -> np.ndarray:
        """int8 (256,): the quantized model input for each pixel value (normalize, then quantize)."""
        norm = self.spec.normalization
        pixels = np.arange(256, dtype=np.float32)
        x = (pixels * np.float32(norm.scale) - np.float32(norm.mean)) / np.float32(norm.std)
        return quantize(x / np.float32(self.tensors[self.input_tensor].scale), -128)

    def epilogue(self, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
        """(S, B), float32 per output channel: y_q = round(acc * S + B) for a conv or upconv layer."""
        assert layer.bias is not None and layer.weight_scale is not None
        s_in = self.tensors[layer.sources[0]].scale
        s_out = self.tensors[layer.output].scale
        if layer.kind == "upconv":  # weight scales are folded into the FP16 weights (per input channel)
            scale = np.full(layer.bias.shape, s_in / s_out, dtype=np.float64)
        else:
            scale = s_in * layer.weight_scale.astype(np.float64) / s_out
        return scale.astype(np.float32), (layer.bias.astype(np.float64) / s_out).astype(np.float32)

    def upconv_weight(self, layer: Layer) -> np.ndarray:
        """float16 (Cin, Cout, 2, 2): an upconv's dequantized weights as the GPU runs them."""
        assert layer.weight is not None and layer.weight_scale is not None
        w = layer.weight.astype(np.float32) * layer.weight_scale.astype(np.float32)[:, None, None, None]
        return w.astype(np.float16)


def quantize(values: np.ndarray, lo: int) -> np.ndarray:
    """int8: round half to even, then clamp to [lo, 127] (what QuantizeLinear and the GPU epilogue do)."""
    return np.clip(np.rint(values), lo, 127).astype(np.int8)


# --- reading the Q/DQ ONNX -------------------------------------------------------------------------------


class _Reader:
    """Walks a Q/DQ U-Net graph in order and builds the plan; refuses anything else, naming the node."""

    def __init__(self, model, spec: EngineSpec) -> None:
        from onnx import numpy_helper

        self.spec = spec
        self.graph = model.graph
        self.arrays = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.const_dq: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # dequantized weights
        self.float_of: dict[str, str] = {}  # float tensor name -> the QTensor it dequantizes
        self.pending: dict[str, tuple[str, Any]] = {}  # float results awaiting their QuantizeLinear
        self.tensors: dict[str, QTensor] = {}
        self.layers: list[Layer] = []
        self.producer: dict[str, Layer] = {}
        self.input_tensor = ""
        self.uses: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1

    def refuse(self, node, why: str) -> EngineError:
        label = node.name or (node.output[0] if node.output else node.op_type)
        return EngineError(f"node {label!r} ({node.op_type}): {why}; only the segqueue U-Net's INT8 Q/DQ graph "
                           "(engines build --precision int8) can become a cuDNN INT8 engine")

    def scale_of(self, node, scale_name: str, zero_name: str | None) -> np.ndarray:
        if scale_name not in self.arrays:
            raise self.refuse(node, f"scale {scale_name!r} is not a constant")
        if zero_name:
            zero = self.arrays.get(zero_name)
            if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
                raise self.refuse(node, "zero points must be int8 zeros (build with --target tensorrt, not cpu)")
        return self.arrays[scale_name].astype(np.float32)

    def attr(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def qtensor_of(self, node, name: str) -> QTensor:
        if name not in self.float_of:
            raise self.refuse(node, f"input {name!r} is not a dequantized INT8 activation")
        return self.tensors[self.float_of[name]]

    def read(self) -> Int8Plan:
        for node in self.graph.node:
            handler = getattr(self, f"on_{node.op_type}", None)
            if handler is None:
                raise self.refuse(node, "operator not supported")
            handler(node)
        return self.finish()

    def on_DequantizeLinear(self, node) -> None:
        source = node.input[0]
        zero = node.input[2] if len(node.input) > 2 else None
        scale = self.scale_of(node, node.input[1], zero)
        if source in self.arrays:  # a weight
            weight = self.arrays[source]
            if weight.dtype != np.int8:
                raise self.refuse(node, f"weight {source!r} is {weight.dtype}, not int8")
            axis = int(self.attr(node, "axis", 1))
            self.const_dq[node.output[0]] = (weight, np.broadcast_to(scale, (weight.shape[axis],)).copy(), axis)
            return
        if source not in self.tensors:
            raise self.refuse(node, f"input {source!r} is not an INT8 activation")
        if scale.size != 1 or not np.isclose(float(scale), self.tensors[source].scale, rtol=1e-6):
            raise self.refuse(node, "dequantizes with another scale than it was quantized with")
        self.float_of[node.output[0]] = source

    def on_QuantizeLinear(self, node) -> None:
        zero = node.input[2] if len(node.input) > 2 else None
        scale = self.scale_of(node, node.input[1], zero)
        if scale.size != 1:
            raise self.refuse(node, "activation scales must be per tensor")
        s = float(scale)
        source, out = node.input[0], node.output[0]
        if source == self.spec.input_name and not self.input_tensor:
            self.tensors[out] = QTensor(out, s, self.spec.channels, 1)
            self.input_tensor = out
            return
        if source not in self.pending:
            raise self.refuse(node, f"quantizes {source!r}, which is not the output of a supported layer")
        kind, info = self.pending.pop(source)
        if kind == "relu":  # Conv -> Q(s) -> DQ -> Relu -> Q(s): the ReLU joins the conv
            qt: QTensor = info
            layer = self.producer[qt.name]
            if layer.kind != "conv" or layer.relu or not np.isclose(s, qt.scale, rtol=1e-6):
                raise self.refuse(node, "a ReLU must follow a conv and keep its scale")
            if self.uses.get(self.float_name_of(qt.name), 0) != 1:
                raise self.refuse(node, "the conv output before the ReLU has other consumers")
            layer.relu = True
            self.alias(out, qt)
            return
        layer = info
        if kind == "pool":
            if not np.isclose(s, self.tensors[layer.sources[0]].scale, rtol=1e-6):
                raise self.refuse(node, "a max pool must keep its input's scale")
        self.add_layer(layer, out, s)

    def float_name_of(self, qname: str) -> str:
        return next((f for f, q in self.float_of.items() if q == qname), "")

    def alias(self, out: str, qt: QTensor) -> None:
        """`out` (a QuantizeLinear output) is the same INT8 tensor as `qt`."""
        self.tensors[out] = qt
        self.producer[out] = self.producer[qt.name]

    def add_layer(self, layer: Layer, out: str, scale: float) -> None:
        sources = [self.tensors[s] for s in layer.sources]
        if layer.kind in ("conv", "upconv"):
            assert layer.weight is not None
            channels = layer.weight.shape[0] if layer.kind == "conv" else layer.weight.shape[1]
        else:
            channels = sum(t.channels for t in sources)
        down = sources[0].downscale
        down = down * 2 if layer.kind == "pool" else down // 2 if layer.kind == "upconv" else down
        if layer.kind == "concat" and len({t.downscale for t in sources}) != 1:
            raise EngineError(f"concat {layer.name!r}: inputs of different sizes")
        layer.output = out
        self.tensors[out] = QTensor(out, scale, int(channels), down)
        self.producer[out] = layer
        self.layers.append(layer)

    def weight_for(self, node, name: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.const_dq:
            raise self.refuse(node, f"weight {name!r} is not a dequantized INT8 constant")
        weight, scale, got_axis = self.const_dq[name]
        if got_axis != axis:
            raise self.refuse(node, f"weight scales are along axis {got_axis}, expected {axis}")
        return weight, scale

    def bias_for(self, node, channels: int) -> np.ndarray:
        if len(node.input) < 3 or not node.input[2]:
            return np.zeros(channels, np.float32)
        if node.input[2] not in self.arrays:
            raise self.refuse(node, "bias must be a float constant")
        return self.arrays[node.input[2]].astype(np.float32).reshape(channels)

    def on_Conv(self, node) -> None:
        x = self.qtensor_of(node, node.input[0])
        weight, scale = self.weight_for(node, node.input[1], 0)
        k = weight.shape[2]
        pads = list(self.attr(node, "pads", [0, 0, 0, 0]))
        ok = (
            weight.shape[2] == weight.shape[3] and k in (1, 3) and pads == [k // 2] * 4
            and list(self.attr(node, "strides", [1, 1])) == [1, 1]
            and list(self.attr(node, "dilations", [1, 1])) == [1, 1] and self.attr(node, "group", 1) == 1
            and weight.shape[1] == x.channels
        )
        if not ok:
            raise self.refuse(node, "only 3x3 (padding 1) and 1x1 convs, stride 1, group 1 are supported")
        name = node.input[1].split(".weight")[0]
        layer = Layer(name, "conv", [x.name], "", kernel=k, weight=weight, weight_scale=scale,
                      bias=self.bias_for(node, weight.shape[0]))
        self.pending[node.output[0]] = ("conv", layer)

    def on_Relu(self, node) -> None:
        self.pending[node.output[0]] = ("relu", self.qtensor_of(node, node.input[0]))

    def on_MaxPool(self, node) -> None:
        x = self.qtensor_of(node, node.input[0])
        if (list(self.attr(node, "kernel_shape", [])) != [2, 2] or list(self.attr(node, "strides", [])) != [2, 2]
                or any(self.attr(node, "pads", [0, 0, 0, 0])) or self.attr(node, "ceil_mode", 0)):
            raise self.refuse(node, "only 2x2 max pooling with stride 2 is supported")
        self.pending[node.output[0]] = ("pool", Layer(node.name or node.output[0], "pool", [x.name], ""))

    def on_ConvTranspose(self, node) -> None:
        x = self.qtensor_of(node, node.input[0])
        weight, scale = self.weight_for(node, node.input[1], 0)
        if (weight.shape[2:] != (2, 2) or list(self.attr(node, "strides", [])) != [2, 2]
                or any(self.attr(node, "pads", [0, 0, 0, 0])) or self.attr(node, "group", 1) != 1
                or any(self.attr(node, "output_padding", [0, 0])) or weight.shape[0] != x.channels):
            raise self.refuse(node, "only 2x2 transposed convs with stride 2 are supported")
        name = node.input[1].split(".weight")[0]
        layer = Layer(name, "upconv", [x.name], "", kernel=2, weight=weight, weight_scale=scale,
                      bias=self.bias_for(node, weight.shape[1]), precision="fp16")
        self.pending[node.output[0]] = ("upconv", layer)

    def on_Concat(self, node) -> None:
        if self.attr(node, "axis", 0) != 1 or len(node.input) != 2:
            raise self.refuse(node, "only a concat of two tensors along channels is supported")
        sources = [self.qtensor_of(node, name).name for name in node.input]
        self.pending[node.output[0]] = ("concat", Layer(node.name or node.output[0], "concat", sources, ""))

    def finish(self) -> Int8Plan:
        outputs = [o.name for o in self.graph.output]
        if not self.input_tensor:
            raise EngineError(f"the graph never quantizes its input {self.spec.input_name!r}")
        if len(outputs) != 1 or outputs[0] not in self.float_of:
            raise EngineError(f"the graph's output {outputs} is not a dequantized INT8 tensor of a head conv")
        logits = self.float_of[outputs[0]]
        head = self.producer.get(logits)
        if head is None or head.kind != "conv" or head.kernel != 1 or head.relu:
            raise EngineError(f"the graph's output {outputs[0]!r} is not the U-Net's 1x1 head conv")
        if self.tensors[logits].channels != self.spec.classes:
            raise EngineError(f"the head has {self.tensors[logits].channels} classes, the metadata says "
                              f"{self.spec.classes}")
        if self.pending:
            raise EngineError(f"results never quantized: {', '.join(sorted(self.pending))}")
        self.fold_upconv_into_concat()
        return Int8Plan(self.spec, self.input_tensor, logits, self.tensors, self.layers)

    def fold_upconv_into_concat(self) -> None:
        """An upconv whose only consumer is a concat is quantized straight to the concat's scale."""
        for layer in self.layers:
            if layer.kind != "concat":
                continue
            for source in layer.sources:
                up = self.producer[source]
                consumers = [other for other in self.layers if up.output in other.sources]
                if up.kind == "upconv" and len(consumers) == 1:
                    t = self.tensors[up.output]
                    self.tensors[up.output] = QTensor(t.name, self.tensors[layer.output].scale, t.channels,
                                                      t.downscale)


def plan_from_onnx(path: Path | str, spec: EngineSpec | None = None) -> Int8Plan:
    """Read an INT8 Q/DQ ONNX (as `engines build --precision int8` writes it) into an Int8Plan.

    spec: the engine metadata (default: `<file>.json` beside it; must say precision int8). Raises
    EngineError naming the file and the first node that is not part of the U-Net's Q/DQ graph.
    """
    import onnx

    path = Path(path)
    spec = spec or EngineSpec.read_beside(path)
    if spec.precision != "int8":
        raise EngineError(f"{path}: is a {spec.precision} ONNX; build the INT8 Q/DQ file first "
                          "(engines build MODEL.onnx --precision int8 --calib DIR -o MODEL_int8.onnx)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise EngineError(f"{path}: not a readable ONNX file ({exc})") from None
    try:
        return _Reader(model, spec).read()
    except EngineError as exc:
        raise EngineError(f"{path}: {exc}") from None


# --- the CPU reference -----------------------------------------------------------------------------------


def reference_masks(plan: Int8Plan, pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) pixels -> uint8 (N, H, W) masks, computing the plan's INT8 math in float64 on the CPU.

    Layers marked fp16 use the FP16 operands the GPU uses (the input as integers, upconv weights
    rounded to FP16), so the GPU engine should match this within one quantization step per layer.
    """
    values = reference_activations(plan, pixels)
    logits = values[plan.logits]
    return first_argmax(logits)


def reference_activations(plan: Int8Plan, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Every INT8 tensor of the plan for `pixels` (uint8 (N, H, W)), as float64 (N, C, H, W) integer values."""
    import torch
    import torch.nn.functional as F

    table = plan.input_table().astype(np.float64)
    values = {plan.input_tensor: torch.from_numpy(table[pixels][:, None])}
    with torch.no_grad():
        for layer in plan.layers:
            x = values[layer.sources[0]]
            if layer.kind == "pool":
                out = F.max_pool2d(x, 2)
            elif layer.kind == "concat":
                parts = [_requantize(values[s], plan.tensor(s).scale, plan.tensor(layer.output).scale)
                         for s in layer.sources]
                out = torch.cat(parts, dim=1)
            else:
                out = _reference_conv(plan, layer, x)
            values[layer.output] = out
    return {name: v.numpy() for name, v in values.items()}


def _requantize(q, s_in: float, s_out: float):
    import torch

    if np.float32(s_in) == np.float32(s_out):
        return q
    ratio = float(np.float32(s_in) / np.float32(s_out))
    return torch.clamp(torch.round(q * ratio), -128, 127)


def _reference_conv(plan: Int8Plan, layer: Layer, x):
    import torch
    import torch.nn.functional as F

    scale, bias = plan.epilogue(layer)
    if layer.kind == "upconv":
        w = torch.from_numpy(plan.upconv_weight(layer).astype(np.float64))
        acc = F.conv_transpose2d(x, w, stride=2)
    else:
        assert layer.weight is not None
        acc = F.conv2d(x, torch.from_numpy(layer.weight.astype(np.float64)), padding=layer.kernel // 2)
    v = acc * torch.from_numpy(scale.astype(np.float64))[:, None, None] + torch.from_numpy(
        bias.astype(np.float64))[:, None, None]
    return torch.clamp(torch.round(v), 0 if layer.relu else -128, 127)


def first_argmax(logits: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W): the index of the largest of (N, C, H, W) logits, the first one on ties."""
    return np.argmax(logits, axis=1).astype(np.uint8)


# --- the file ----------------------------------------------------------------------------------------------


def save_plan(plan: Int8Plan, path: Path | str, built_with: dict[str, str]) -> Path:
    """Write the plan as a `.cudnn` file: a zip of `plan.json` and one `.npy` per array. Returns the path."""
    path = Path(path)
    doc = {
        "format": FORMAT,
        "spec": json.loads(plan.spec.to_json()),
        "input_tensor": plan.input_tensor,
        "logits": plan.logits,
        "batch_sizes": list(plan.batch_sizes),
        "tensors": [asdict(t) for t in plan.tensors.values()],
        "layers": [layer.describe() for layer in plan.layers],
        "built_with": built_with,
    }
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("plan.json", json.dumps(doc, indent=1, sort_keys=True))
        for index, layer in enumerate(plan.layers):
            for key in ("weight", "weight_scale", "bias"):
                array = getattr(layer, key)
                if array is not None:
                    buffer = io.BytesIO()
                    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
                    archive.writestr(f"layers/{index}/{key}.npy", buffer.getvalue())
    tmp.replace(path)
    return path


def read_plan_document(path: Path | str) -> dict[str, Any]:
    """The `.cudnn` file's JSON document (spec, layers with precisions and plans, built_with)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            doc = json.loads(archive.read("plan.json"))
    except FileNotFoundError:
        raise EngineError(f"{path}: cuDNN INT8 engine file not found") from None
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise EngineError(f"{path}: not a cuDNN INT8 engine file ({exc})") from None
    if doc.get("format") != FORMAT:
        raise EngineError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def load_plan(path: Path | str) -> tuple[Int8Plan, dict[str, str]]:
    """Read a `.cudnn` file: (plan, built_with). EngineError naming the file if it is not one."""
    path = Path(path)
    doc = read_plan_document(path)
    try:
        with zipfile.ZipFile(path) as archive:
            layers = []
            for index, data in enumerate(doc["layers"]):
                arrays = {}
                for key in ("weight", "weight_scale", "bias"):
                    member = f"layers/{index}/{key}.npy"
                    if member in archive.namelist():
                        arrays[key] = np.load(io.BytesIO(archive.read(member)), allow_pickle=False)
                fields = {k: v for k, v in data.items() if k in Layer.__dataclass_fields__}
                layers.append(Layer(**fields, **arrays))
        tensors = {t["name"]: QTensor(**t) for t in doc["tensors"]}
        plan = Int8Plan(EngineSpec.from_dict(doc["spec"]), doc["input_tensor"], doc["logits"], tensors, layers,
                        tuple(int(b) for b in doc["batch_sizes"]))
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        raise EngineError(f"{path}: malformed cuDNN INT8 engine ({type(exc).__name__}: {exc})") from None
    return plan, {str(k): str(v) for k, v in doc.get("built_with", {}).items()}
