"""torch2trt `.pth` files: a TRTModule's state dict, read without torch2trt and without unpickling code.

torch2trt saves `torch.save(model_trt.state_dict(), "x.pth")`; TRTModule's state-dict hook stores
under its prefix ("" for a bare TRTModule, e.g. "module." when wrapped):
    <prefix>engine:        bytearray of the serialized TensorRT engine (some versions: a uint8 tensor)
    <prefix>input_names:   list of input tensor names,  e.g. ["input_0"]
    <prefix>output_names:  list of output tensor names, e.g. ["output_0"]
    <prefix>input_flattener / output_flattener: dicts of plain values (newer versions; unused here)
The file is read with `torch.load(weights_only=True)`, which admits tensors and plain containers
(bytearray included, allowed explicitly where a torch version needs it), so nothing in it can run
code. The engine then runs through engines.tensorrt_engine; the spec (normalization, size) comes
from `<file>.pth.json` when present, else from defaults and the engine's own tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineError
from engines.checkpoint import load_weights_only


@dataclass(frozen=True)
class Torch2TrtFile:
    """A parsed torch2trt file: the serialized engine and its tensor names, in binding order."""

    engine_bytes: bytes
    input_names: list[str]
    output_names: list[str]


def _safe_load(path: Path) -> Any:
    """load_weights_only, admitting bytearray too (torch2trt's engine container)."""
    return load_weights_only(path, "a safely readable torch file", allow=(bytearray,))


def _engine_prefix(data: Any) -> str | None:
    """The TRTModule prefix under which `data` holds engine/input_names/output_names, or None."""
    if not isinstance(data, dict):
        return None
    prefixes = [k[: -len("engine")] for k in data if isinstance(k, str) and k.endswith("engine")]
    found = [p for p in prefixes if f"{p}input_names" in data and f"{p}output_names" in data]
    if len(found) > 1:
        raise EngineError(f"the file holds {len(found)} TensorRT engines ({found}); one is expected")
    return found[0] if found else None


def is_torch2trt_file(path: Path | str) -> bool:
    """True when `path` is a torch2trt state dict (engine + input_names + output_names), False otherwise.

    Never raises for unreadable or foreign files (they are simply not torch2trt files).
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return _engine_prefix(_safe_load(path)) is not None
    except Exception:
        return False


def _names(value: Any, key: str, path: Path) -> list[str]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise EngineError(f"{path}: {key} must be a non-empty list of tensor names, got {value!r}")


def parse_torch2trt(path: Path | str) -> Torch2TrtFile:
    """Read a torch2trt `.pth`: the serialized engine (bytes) and its input/output tensor names.

    Raises EngineError naming the file when it cannot be read safely, or lacks an engine or names.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: torch2trt file not found")
    data = _safe_load(path)
    try:
        prefix = _engine_prefix(data)
    except EngineError as exc:
        raise EngineError(f"{path}: {exc}") from None
    if prefix is None:
        raise EngineError(f"{path}: not a torch2trt file (no engine, input_names and output_names entries)")
    raw = data[f"{prefix}engine"]
    if isinstance(raw, (bytes, bytearray)):
        engine = bytes(raw)
    elif isinstance(raw, torch.Tensor) and raw.dtype in (torch.uint8, torch.int8):
        engine = raw.contiguous().view(torch.uint8).numpy().tobytes()
    else:
        raise EngineError(f"{path}: engine entry is a {type(raw).__name__}, expected bytes or a uint8 tensor")
    if not engine:
        raise EngineError(f"{path}: engine entry is empty")
    return Torch2TrtFile(
        engine_bytes=engine,
        input_names=_names(data[f"{prefix}input_names"], "input_names", path),
        output_names=_names(data[f"{prefix}output_names"], "output_names", path),
    )
