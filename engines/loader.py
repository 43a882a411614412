"""Open any engine file by its extension: the file says what it is."""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine, EngineError, EngineSpec

ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth")
TENSORRT_SUFFIXES = (".trt", ".engine", ".plan")


def load_engine(path: Path | str, device: str = "cpu", precision: str | None = None) -> Engine:
    """Load an engine file and return it ready to `submit`.

    .onnx -> OnnxEngine (metadata from `<file>.onnx.json`; precision must be None or match it).
    .pt/.pth -> TorchEngine (metadata inside the checkpoint; precision None means fp32).
    .trt/.engine/.plan -> EngineError (TensorRT is not supported yet). Missing files and unknown
    extensions raise EngineError naming the file. device: "cpu" or "cuda[:i]".
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TENSORRT_SUFFIXES:
        raise EngineError(
            f"{path}: TensorRT plans are not supported yet; export the model to ONNX "
            "(engines export) and load the .onnx file, or load the .pt checkpoint"
        )
    if suffix not in ONNX_SUFFIXES + TORCH_SUFFIXES:
        known = ", ".join(ONNX_SUFFIXES + TORCH_SUFFIXES + TENSORRT_SUFFIXES)
        raise EngineError(f"{path}: unknown engine file type {suffix or '(no extension)'!r} (known: {known})")
    if not path.is_file():
        raise EngineError(f"{path}: engine file not found")
    if suffix in ONNX_SUFFIXES:
        from engines.onnx_engine import OnnxEngine

        engine = OnnxEngine(path, device=device)
        if precision is not None and precision != engine.spec.precision:
            engine.close()
            raise EngineError(
                f"{path}: is a {engine.spec.precision} engine, {precision} was requested; export another file"
            )
        return engine
    from engines.torch_engine import TorchEngine

    return TorchEngine(path, device=device, precision=precision or "fp32")


def read_spec(path: Path | str) -> EngineSpec:
    """An engine file's spec without loading a runtime (for `engines info` and pre-flight checks)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise EngineError(f"{path}: engine file not found")
    if suffix in TORCH_SUFFIXES:
        from engines.checkpoint import load_checkpoint

        return load_checkpoint(path).spec
    if suffix in ONNX_SUFFIXES + TENSORRT_SUFFIXES:
        return EngineSpec.read_beside(path)
    raise EngineError(f"{path}: unknown engine file type {suffix or '(no extension)'!r}")
