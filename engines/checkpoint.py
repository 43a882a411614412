"""U-Net checkpoints: a plain dict of tensors and JSON-like values, loaded with weights_only=True.

File layout (torch.save of a dict):
    {"format": "segqueue-unet/1", "config": UNetConfig as dict, "state_dict": {name: tensor},
     "spec": EngineSpec as dict, "training": {free-form: command, steps, held-out Dice, ...}}
Nothing is ever unpickled beyond tensors and plain containers: a file that needs more is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineError, EngineSpec
from engines.unet import UNet, UNetConfig

FORMAT = "segqueue-unet/1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: model config, weights (CPU tensors), engine spec and training record."""

    path: Path
    config: UNetConfig
    state_dict: dict[str, torch.Tensor]
    spec: EngineSpec
    training: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> UNet:
        """A CPU UNet in eval mode with these weights; EngineError if they do not fit the config."""
        model = UNet(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise EngineError(f"{self.path}: weights do not match config {self.config} ({first})") from None
        return model.eval()


def save_checkpoint(
    path: Path | str, model: UNet, spec: EngineSpec, training: dict[str, Any] | None = None
) -> Path:
    """Write `model` (weights moved to CPU), its spec and a training record to `path`; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "spec": asdict(spec),
        "training": dict(training or {}),
    }
    torch.save(payload, path)
    return path


def load_weights_only(path: Path, what: str, *, allow: Sequence[type] = (), mmap: bool = False) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`: the one way this project reads torch files.

    Only tensors and plain containers (plus the types in `allow`) are admitted, so nothing in the
    file can run code. A corrupt or truncated file, or one that needs more, raises EngineError
    "{path}: not {what} (...)", e.g. what="a readable torch checkpoint". mmap: map the file instead of reading it.
    """
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    guard = safe_globals(list(allow)) if allow and safe_globals is not None else contextlib.nullcontext()
    try:
        with guard:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # corrupt zip, truncated file, refused pickle: all the same to a user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EngineError(f"{path}: not {what} ({type(exc).__name__}: {first[:200]})") from None


def require_format(path: Path, data: Any, fmt: str, what: str) -> dict:
    """`data` if it is a dict whose "format" is `fmt`; else EngineError "{path}: not a {what} (format: ...)"."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EngineError(f"{path}: not a {what} (format: {found!r})")
    return data


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint with `torch.load(..., weights_only=True)`.

    Raises EngineError naming the file when it is missing, corrupt, holds anything beyond tensors and
    plain containers, or is not a "segqueue-unet/1" checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: checkpoint file not found")
    data = require_format(path, load_weights_only(path, "a readable torch checkpoint"), FORMAT, f"{FORMAT} checkpoint")
    missing = [k for k in ("config", "state_dict", "spec") if not isinstance(data.get(k), dict)]
    if missing:
        raise EngineError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:
        config = UNetConfig.from_dict(data["config"])
        spec = EngineSpec.from_dict(data["spec"])
    except (TypeError, ValueError) as exc:
        raise EngineError(f"{path}: bad config or spec in checkpoint ({exc})") from None
    training = data.get("training")
    if not isinstance(training, dict):
        training = {}
    return Checkpoint(path=path, config=config, state_dict=data["state_dict"], spec=spec, training=training)


def load_model(path: Path | str) -> tuple[UNet, Checkpoint]:
    """Load a checkpoint and build its CPU model in eval mode: (model, checkpoint)."""
    ckpt = load_checkpoint(path)
    return ckpt.build_model(), ckpt
