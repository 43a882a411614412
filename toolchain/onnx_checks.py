"""Checks every written ONNX graph goes through (export, FP16 conversion, INT8 quantization)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from engines.base import EngineError


def op_counts(model) -> dict[str, int]:
    """{"Conv": 19, "QuantizeLinear": 50, ...} for an onnx ModelProto."""
    return dict(Counter(node.op_type for node in model.graph.node))


def check_onnx(model, path: Path, what: str) -> None:
    """Run onnx.checker (full check) on `model`; EngineError naming `path` and `what` model it is."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise EngineError(f"{path}: {what} model fails onnx.checker ({str(exc)[:300]})") from None
