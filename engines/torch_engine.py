"""Torch engine: the eager U-Net from a segqueue-unet/1 checkpoint, on CPU or one CUDA device.

CPU: the batch runs on one background thread (like the ONNX engine), FP32 only.
CUDA: two slots, each owning a pinned uint8 input buffer, a pinned uint8 output buffer, a CUDA
stream and an event. A batch is copied into its slot's pinned buffer, then on the slot's stream:
H2D (uint8, non_blocking) -> normalize -> model (FP16 weights + channels_last when precision is
"fp16") -> argmax -> uint8 -> D2H (non_blocking) -> event. `result()` waits on that event only; no
device-wide synchronize in the steady state. Not thread-safe: one caller thread submits and
collects.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engines.base import EngineError, EngineSpec, check_batch
from engines.checkpoint import load_model
from engines.runner import BackgroundRunner
from engines.versions import built_with

PRECISIONS = ("fp32", "fp16")


class TorchEngine:
    """Eager U-Net engine. `submit(uint8 (N, H, W))` -> InFlight; `result()` -> uint8 (N, H, W).

    checkpoint_path: a .pt/.pth written by engines.checkpoint. device: "cpu" or "cuda[:i]".
    precision: "fp32", or "fp16" (CUDA only). slots = 2.
    """

    slots = 2

    def __init__(self, checkpoint_path: Path | str, device: str = "cpu", precision: str = "fp32") -> None:
        self.path = Path(checkpoint_path)
        if precision not in PRECISIONS:
            raise EngineError(f"{self.path}: precision must be one of {PRECISIONS}, got {precision!r}")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise EngineError(f"{self.path}: device {device} requested but torch sees no CUDA device")
        elif device != "cpu":
            raise EngineError(f"{self.path}: unknown device {device!r} (use cpu or cuda[:i])")
        elif precision != "fp32":
            raise EngineError(f"{self.path}: precision {precision} needs a CUDA device; on CPU use fp32")
        model, ckpt = load_model(self.path)
        self.device = torch.device(device)
        self.precision = precision
        extra = {}
        if self.device.type == "cuda":  # fp32 convolutions use TF32 unless torch is told otherwise
            extra = {
                "gpu": torch.cuda.get_device_name(self.device),
                "cudnn_tf32": str(torch.backends.cudnn.allow_tf32),
            }
        self.spec: EngineSpec = replace(
            ckpt.spec, precision=precision, built_with={**ckpt.spec.built_with, **built_with(device, **extra)}
        )
        self.name = f"torch:{device} {precision} {self.path.name}"
        norm = self.spec.normalization
        self._scale, self._mean, self._std = float(norm.scale), float(norm.mean), float(norm.std)
        self._closed = False
        if self.device.type == "cpu":
            self._model = model
            self._runner: BackgroundRunner | None = BackgroundRunner(self._run_cpu, self.name)
            self._slots: list[_CudaSlot] = []
        else:
            model = model.to(self.device, memory_format=torch.channels_last)
            self._model = model.half() if precision == "fp16" else model
            self._runner = None
            shape = (self.spec.max_batch, self.spec.height, self.spec.width)
            self._slots = [_CudaSlot(shape, self.device) for _ in range(self.slots)]
            self._next = 0
            torch.cuda.synchronize(self.device)  # once, at load: weights are on the device

    # -- CPU -------------------------------------------------------------------------------------
    def _run_cpu(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).unsqueeze(1).float()
            logits = self._model(self._normalize(x))
            return logits.argmax(dim=1).to(torch.uint8).numpy()

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self._scale
        if self._mean:
            x = x - self._mean
        if self._std != 1.0:
            x = x / self._std
        return x

    # -- CUDA ------------------------------------------------------------------------------------
    def _submit_cuda(self, images: np.ndarray) -> "_CudaInFlight":
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        slot.release()  # the slot's previous batch: collect its masks before its buffers are reused
        n = images.shape[0]
        slot.host_in[:n].numpy()[...] = images
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        with torch.cuda.stream(slot.stream), torch.inference_mode():
            x = slot.host_in[:n].to(self.device, non_blocking=True)
            x = self._normalize(x.unsqueeze(1).to(dtype)).contiguous(memory_format=torch.channels_last)
            masks = self._model(x).argmax(dim=1).to(torch.uint8)
            slot.host_out[:n].copy_(masks, non_blocking=True)
            slot.done.record(slot.stream)
        flight = _CudaInFlight(slot, n, self.name)
        slot.pending = flight
        return flight

    # -- Engine ----------------------------------------------------------------------------------
    def submit(self, images: np.ndarray):  # -> InFlight
        """Check and start one uint8 (N, H, W) batch; returns an InFlight of uint8 (N, H, W) masks."""
        if self._closed:
            raise EngineError(f"{self.name}: engine is closed")
        check_batch(self.spec, images)
        if self._runner is not None:
            return self._runner.submit(images)
        try:
            return self._submit_cuda(images)
        except RuntimeError as exc:
            raise EngineError(f"{self.name}: inference failed ({exc})") from exc

    def close(self) -> None:
        """Finish in-flight batches, free the model and buffers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            self._runner.close()
        for slot in self._slots:
            slot.release()
        self._slots = []
        self._model = None  # type: ignore[assignment]

    def __enter__(self) -> "TorchEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CudaSlot:
    """One in-flight batch's resources: pinned uint8 host buffers, a stream and an event."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device) -> None:
        self.host_in = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        self.host_out = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        self.stream = torch.cuda.Stream(device=device)
        self.done = torch.cuda.Event()
        self.pending: _CudaInFlight | None = None

    def release(self) -> None:
        """Make the slot reusable: the pending batch (if any) copies its masks out first."""
        if self.pending is not None:
            self.pending.fetch()


class _CudaInFlight:
    """A batch on a CUDA slot; `result()` waits on the slot's event and returns uint8 (N, H, W)."""

    def __init__(self, slot: _CudaSlot, n: int, label: str) -> None:
        self._slot: _CudaSlot | None = slot
        self._n = n
        self._label = label
        self._masks: np.ndarray | None = None

    def fetch(self) -> None:
        """Wait for this batch and copy its masks out of the slot (once)."""
        slot = self._slot
        if slot is None:
            return
        self._slot = None
        try:
            slot.done.synchronize()
        except RuntimeError as exc:
            slot.pending = None
            raise EngineError(f"{self._label}: inference failed ({exc})") from exc
        self._masks = slot.host_out[: self._n].numpy().copy()
        slot.pending = None

    def result(self) -> np.ndarray:
        """The batch's masks, uint8 (N, H, W); blocks until the GPU has finished it."""
        self.fetch()
        if self._masks is None:
            raise EngineError(f"{self._label}: batch failed earlier")
        return self._masks
