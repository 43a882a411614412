"""Open any engine file by its extension: the file says what it is.

    .onnx               ONNX Runtime (metadata in `<file>.onnx.json`)
    .pt / .pth          torch checkpoint (segqueue-unet/1), or a torch2trt file (serialized TensorRT
                        engine + tensor names; metadata optionally in `<file>.pth.json`)
    .ptc                compiled torch engine (checkpoint + torch.compile cache; CUDA only)
    .trt/.engine/.plan  TensorRT plan (metadata in `<file>.json`)
    .cudnn              cuDNN INT8 engine (plan, weights and metadata inside; CUDA only; engines/cudnn_int8.py)

Files that record what built them (TensorRT plans, compiled engines) are checked at load against
this machine (engines.versions.check_compatible): another GPU, compute capability, TensorRT or torch
version is refused with a message saying what to rebuild and how.

Loading an engine file can run code from it (a compiled engine's `.ptc` cache is unpickled by
torch's compiler), and every format is parsed by native runtimes (ONNX Runtime, TensorRT) that are
not built for hostile input: an engine file must be trusted as much as the worker's own code.
`verify_sha256` pins one: the worker refuses a file whose SHA-256 is not the one it was given
(`worker run --engine-sha256`).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

from engines.base import DEFAULT_SLOTS, Engine, EngineError, EngineSpec, metadata_path
from engines.versions import check_compatible

ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth")
COMPILED_SUFFIXES = (".ptc",)
TENSORRT_SUFFIXES = (".trt", ".engine", ".plan")
CUDNN_SUFFIXES = (".cudnn",)
KNOWN_SUFFIXES = ONNX_SUFFIXES + TORCH_SUFFIXES + COMPILED_SUFFIXES + TENSORRT_SUFFIXES + CUDNN_SUFFIXES

__all__ = ["load_engine", "read_spec", "check_compatible", "file_sha256", "verify_sha256", "KNOWN_SUFFIXES"]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, as 64 lowercase hex digits (read in chunks, any size)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verify_sha256(path: Path | str, expected: str) -> str:
    """Check that the engine file `path` has the SHA-256 `expected` (64 hex digits, any case); return it.

    Only the file itself is hashed: the metadata JSON beside an `.onnx` or TensorRT file is data,
    not code. Raises EngineError, one line naming the file and both hashes, if they differ;
    EngineError too if `expected` is not 64 hex digits or the file cannot be read.
    """
    path = Path(path)
    wanted = expected.strip().lower()
    if not _SHA256_HEX.fullmatch(wanted):
        raise EngineError(f"{path}: the expected SHA-256 {expected!r} is not 64 hex digits")
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise EngineError(f"{path}: cannot read the engine file to check its SHA-256: {exc.strerror or exc}") from None
    if actual != wanted:
        raise EngineError(f"{path}: SHA-256 is {actual}, expected {wanted}; refusing to load an engine file "
                          "that is not the pinned one")
    return actual


def _check_precision(path: Path, engine: Engine, precision: str | None) -> Engine:
    if precision is not None and precision != engine.spec.precision:
        engine.close()
        raise EngineError(f"{path}: is a {engine.spec.precision} engine, {precision} was requested; build another file")
    return engine


def load_engine(path: Path | str, device: str = "cpu", precision: str | None = None,
                slots: int | None = None) -> Engine:
    """Load an engine file and return it ready to `submit`.

    .onnx -> OnnxEngine (precision must be None or match its metadata).
    .pt/.pth -> TorchEngine (precision None means fp32; fp16 and amp need CUDA), or, for a torch2trt
    file, TensorRTEngine (CUDA; precision None or its metadata's).
    .ptc -> CompiledTorchEngine (CUDA only; precision None or fp16).
    .trt/.engine/.plan -> TensorRTEngine (CUDA; needs `import tensorrt`; precision None or its metadata's).
    Missing files, unknown extensions, absent TensorRT and metadata mismatches raise EngineError
    naming the file. device: "cpu" or "cuda[:i]".
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in KNOWN_SUFFIXES:
        raise EngineError(
            f"{path}: unknown engine file type {suffix or '(no extension)'!r} (known: {', '.join(KNOWN_SUFFIXES)})"
        )
    if not path.is_file():
        kind = "TensorRT plan" if suffix in TENSORRT_SUFFIXES else "engine"
        raise EngineError(f"{path}: {kind} file not found")
    if slots is not None and not (device.startswith("cuda") and suffix not in ONNX_SUFFIXES):
        raise EngineError(f"{path}: the number of batches in flight can be set for CUDA engines only (eager and "
                          f"compiled torch, TensorRT, cuDNN INT8), not for this one on {device}")
    in_flight = DEFAULT_SLOTS if slots is None else slots
    if suffix in ONNX_SUFFIXES:
        from engines.onnx_engine import OnnxEngine

        return _check_precision(path, OnnxEngine(path, device=device), precision)
    if suffix in TENSORRT_SUFFIXES:
        from engines.tensorrt_engine import TensorRTEngine, import_tensorrt

        import_tensorrt()  # the clear "TensorRT is not installed here" error comes first
        engine = TensorRTEngine(path, device=_gpu_device(path, device), slots=in_flight)
        return _check_precision(path, engine, precision)
    if suffix in CUDNN_SUFFIXES:
        from engines.cudnn_int8 import CudnnInt8Engine

        if precision not in (None, "int8"):
            raise EngineError(f"{path}: a cuDNN engine is int8, {precision} was requested")
        return CudnnInt8Engine(path, device=device, slots=in_flight)
    if suffix in COMPILED_SUFFIXES:
        from engines.compiled_engine import CompiledTorchEngine

        if precision not in (None, "fp16"):
            raise EngineError(f"{path}: a compiled engine is fp16, {precision} was requested")
        return CompiledTorchEngine(path, device=device, slots=in_flight)
    from engines.torch2trt_file import is_torch2trt_file

    if is_torch2trt_file(path):
        return _check_precision(path, _load_torch2trt(path, _gpu_device(path, device), slots=in_flight), precision)
    from engines.torch_engine import TorchEngine

    return TorchEngine(path, device=device, precision=precision or "fp32", slots=in_flight)


def _gpu_device(path: Path, device: str) -> str:
    if not device.startswith("cuda"):
        raise EngineError(f"{path}: TensorRT engines run on CUDA only; use --device cuda (got {device!r})")
    return device


def _torch2trt_spec(path: Path) -> tuple[EngineSpec, bool]:
    """(spec, from_file): `<file>.pth.json` if present, else defaults (shapes then come from the engine)."""
    meta = metadata_path(path)
    if meta.is_file():
        return EngineSpec.read_beside(path), True
    spec = EngineSpec(precision="unknown", built_with={"source": "torch2trt", "metadata": "none (defaults)"})
    return spec, False


def _load_torch2trt(path: Path, device: str, slots: int = DEFAULT_SLOTS) -> Engine:
    from engines.tensorrt_engine import TensorRTEngine, import_tensorrt
    from engines.torch2trt_file import parse_torch2trt

    import_tensorrt()
    parsed = parse_torch2trt(path)
    spec, from_file = _torch2trt_spec(path)
    if not from_file:
        n = spec.normalization
        warnings.warn(
            f"{path}: no metadata file {metadata_path(path).name} beside it; input size, classes and batch range "
            f"are taken from the engine, normalization defaults to (pixel * {n.scale:.6g} - {n.mean:g}) / {n.std:g} "
            "and precision is 'unknown'. Write that JSON (an EngineSpec, as `engines info` prints) if the model "
            "was trained with another normalization.",
            stacklevel=3,
        )
    return TensorRTEngine(
        path,
        device=device,
        engine_bytes=parsed.engine_bytes,
        spec=spec,
        input_names=parsed.input_names,
        output_names=parsed.output_names,
        slots=slots,
        rebuild=(
            "torch2trt engines only run on the TensorRT version and GPU that built them: rebuild with torch2trt "
            "there, or export the checkpoint to ONNX and `engines build` a plan on this machine."
        ),
        infer_shapes=not from_file,
    )


def read_spec(path: Path | str) -> EngineSpec:
    """An engine file's spec without loading a runtime (for `engines info` and pre-flight checks).

    torch2trt files without `<file>.pth.json` give default values (their shapes live in the engine).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise EngineError(f"{path}: engine file not found")
    if suffix in TORCH_SUFFIXES:
        from engines.torch2trt_file import is_torch2trt_file

        if is_torch2trt_file(path):
            return _torch2trt_spec(path)[0]
        from engines.checkpoint import load_checkpoint

        return load_checkpoint(path).spec
    if suffix in COMPILED_SUFFIXES:
        from engines.compiled_engine import read_compiled

        return read_compiled(path).spec
    if suffix in CUDNN_SUFFIXES:
        from engines.int8_plan import read_plan_document

        return EngineSpec.from_dict(read_plan_document(path)["spec"])
    if suffix in ONNX_SUFFIXES + TENSORRT_SUFFIXES:
        return EngineSpec.read_beside(path)
    raise EngineError(f"{path}: unknown engine file type {suffix or '(no extension)'!r}")
