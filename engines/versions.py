"""What built an engine: library versions and device, for EngineSpec.built_with."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def built_with(device: str = "cpu", **extra: str) -> dict[str, str]:
    """{"torch", "onnx", "onnxruntime", "python", "device", ...extra}: versions as strings."""
    info = {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "device": device,
    }
    info.update({k: str(v) for k, v in extra.items()})
    return info
