"""What built an engine (library versions and device, for EngineSpec.built_with), and the check that
an engine file was built for the machine that loads it."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from engines.base import EngineError


def package_version(dist: str) -> str:
    """The installed version of distribution `dist`, or "absent"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def built_with(device: str = "cpu", **extra: str) -> dict[str, str]:
    """{"torch", "onnx", "onnxruntime", "python", "device", ...extra}: versions as strings."""
    info = {
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
        "device": device,
    }
    info.update({k: str(v) for k, v in extra.items()})
    return info


def gpu_identity(device: str = "cuda") -> dict[str, str]:
    """{"gpu": device name, "compute_capability": "major.minor"} of a CUDA device, e.g. "9.0".

    Asks torch (which owns the CUDA context in this project); raises EngineError without CUDA.
    """
    import torch

    if not torch.cuda.is_available():
        raise EngineError(f"device {device}: torch sees no CUDA device")
    dev = torch.device(device)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def check_compatible(
    path: Path | str,
    recorded: Mapping[str, str],
    current: Mapping[str, str],
    rebuild: str,
    required: bool = True,
) -> None:
    """Refuse an engine file built for another setup than this one.

    recorded: the file's `built_with`. current: the same keys as measured here (e.g. "gpu",
    "compute_capability", "tensorrt" or "torch"). Every key of `current` whose recorded value
    differs is listed in the EngineError, followed by `rebuild` (what to rebuild, and how). With
    required=True a key the file does not record counts as a mismatch ("not recorded").
    """
    problems = []
    for key, here in current.items():
        if key not in recorded:
            if required:
                problems.append(f"{key} not recorded (here: {here})")
            continue
        if str(recorded[key]) != str(here):
            problems.append(f"{key} {recorded[key]!r} (here: {here!r})")
    if problems:
        raise EngineError(f"{path}: built for another setup: {'; '.join(problems)}. {rebuild}")
