"""FP16 ONNX (`convert_fp16`), built from an FP32 ONNX U-Net and its metadata.

Every weight and every internal activation becomes float16; the graph's input "image" and
output "logits" stay float32 (`keep_io_types=True`): one Cast after the input and one before
the output. So every runtime feeds the same normalized float32 batch and reads float32 logits,
and the engine code (normalize, argmax) does not change with precision. It is the graph that
TensorRT 11 (strongly typed: precision comes from the graph) builds as an FP16 engine. ONNX
Runtime on an x86 CPU has no float16 convolution kernels: it runs the file by casting back to
float32 (same speed as FP32, weights rounded to float16); the file is for GPU runtimes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from engines.base import EngineError, metadata_path
from engines.versions import built_with
from toolchain.onnx_checks import op_counts
from toolchain.onnx_precision import (
    CHECK_IMAGES,
    PrecisionResult,
    carried_keys,
    compare_with_source,
    quiet,
    source_spec,
    write_checked,
)

#: FP16 self-check: max |logit_fp16 - logit_fp32| allowed on the check images
FP16_TOLERANCE = 0.1


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


def float16_converter():
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
    source, output = Path(source), Path(output)
    spec = source_spec(source, output)
    convert, tool = float16_converter()
    model = onnx.load(str(source))
    with quiet():
        model16 = convert(model, keep_io_types=True)
    topological_sort(model16.graph)
    write_checked(model16, output)
    diff, agreement = compare_with_source(source, output, spec)
    if not diff < FP16_TOLERANCE:
        output.unlink(missing_ok=True)
        raise EngineError(f"{output}: FP16 logits differ from FP32 by {diff:.3g} (limit {FP16_TOLERANCE})")
    final = replace(
        spec,
        precision="fp16",
        built_with=built_with(
            "cpu", **carried_keys(spec), source=source.name, converter=f"{tool}.convert_float_to_float16",
            io_types="float32 (keep_io_types=True)",
            check=f"max |logit - fp32| {diff:.3g}, masks agree {agreement:.4%} on {CHECK_IMAGES} synthetic images",
        ),
    )
    meta = metadata_path(output)
    meta.write_text(final.to_json() + "\n")
    return PrecisionResult(output, meta, final, op_counts(model16), diff, agreement)
