"""Torch engine: the eager U-Net from a segqueue-unet/1 checkpoint, on CPU or one CUDA device.

CPU: the batch runs on one background thread (like the ONNX engine), FP32 only.
CUDA: two slots (engines.cuda_slots), each owning pinned uint8 host buffers, a CUDA stream and an
event. On the slot's stream: H2D uint8 -> normalize -> model -> argmax -> uint8 -> D2H -> event;
`result()` waits on that event only. Precisions on CUDA:
  "fp32": FP32 weights, channels_last (convolutions use TF32 when torch.backends.cudnn.allow_tf32,
          torch's default, is on; the engine records the setting in built_with);
  "amp":  FP32 weights, channels_last, run under torch.autocast(float16) (the study's "FP16 torch AMP");
  "fp16": FP16 weights (model.half()) and input, channels_last.
cuDNN autotuning (torch.backends.cudnn.benchmark) is turned on for CUDA engines: the worker feeds at
most max_batch distinct shapes, each tuned once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engines.base import DEFAULT_SLOTS, EngineBase, EngineError, EngineSpec, Normalization
from engines.checkpoint import load_model
from engines.cuda_slots import CudaSlot, CudaSlots, cuda_device
from engines.runner import BackgroundRunner
from engines.versions import built_with

PRECISIONS = ("fp32", "fp16", "amp")


def normalize_tensor(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Float pixels -> model input: (x * scale - mean) / std, in x's dtype and device."""
    x = x * float(norm.scale)
    if norm.mean:
        x = x - float(norm.mean)
    if norm.std != 1.0:
        x = x / float(norm.std)
    return x


class TorchEngine(EngineBase):
    """Eager U-Net engine. `submit(uint8 (N, H, W))` -> InFlight; `result()` -> uint8 (N, H, W).

    checkpoint_path: a .pt/.pth written by engines.checkpoint. device: "cpu" or "cuda[:i]".
    precision: "fp32", or on CUDA "fp16" (half weights) or "amp" (autocast FP16). slots: batches in flight
    on CUDA (2 by default; the CPU path keeps 2).
    """

    def __init__(self, checkpoint_path: Path | str, device: str = "cpu", precision: str = "fp32",
                 slots: int = DEFAULT_SLOTS) -> None:
        self.path = Path(checkpoint_path)
        if precision not in PRECISIONS:
            raise EngineError(f"{self.path}: precision must be one of {PRECISIONS}, got {precision!r}")
        if device == "cpu":
            if precision != "fp32":
                raise EngineError(f"{self.path}: precision {precision} needs a CUDA device; on CPU use fp32")
            self.device = torch.device("cpu")
        elif device.startswith("cuda"):
            self.device = cuda_device(device, str(self.path))
        else:
            raise EngineError(f"{self.path}: unknown device {device!r} (use cpu or cuda[:i])")
        model, ckpt = load_model(self.path)
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
        self._runner: BackgroundRunner | None = None
        self._slots: CudaSlots | None = None
        if self.device.type == "cpu":
            self._model = model
            self._runner = BackgroundRunner(self._run_cpu, self.name)
        else:
            torch.backends.cudnn.benchmark = True
            # Module.to takes memory_format (torch documents it); torch's overloads leave it out
            model = model.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
            self._model = model.half() if precision == "fp16" else model
            self._dtype = torch.float16 if precision == "fp16" else torch.float32
            self._slots = CudaSlots(self.device, self.spec.max_batch, self.spec.height, self.spec.width, self.name,
                                    count=slots)
            self.slots = slots
            torch.cuda.synchronize(self.device)  # once, at load: weights are on the device

    # -- CPU -------------------------------------------------------------------------------------
    def _run_cpu(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).unsqueeze(1).float()
            logits = self._model(normalize_tensor(x, self.spec.normalization))
            return logits.argmax(dim=1).to(torch.uint8).numpy()

    # -- CUDA ------------------------------------------------------------------------------------
    def _compute(self, x: torch.Tensor, slot: CudaSlot) -> torch.Tensor:
        """uint8 (n, H, W) on the device -> uint8 masks (n, H, W), on the current (slot's) stream."""
        x = normalize_tensor(x.unsqueeze(1).to(self._dtype), self.spec.normalization)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "amp":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = self._model(x)
        else:
            logits = self._model(x)
        return logits.argmax(dim=1).to(torch.uint8)

    # -- Engine ----------------------------------------------------------------------------------
    def _start(self, images: np.ndarray):
        if self._runner is not None:
            return self._runner.submit(images)
        return self._slots.submit(images, self._compute)  # type: ignore[union-attr]

    def _release(self) -> None:
        if self._runner is not None:
            self._runner.close()
        if self._slots is not None:
            self._slots.close()
        self._model = None  # type: ignore[assignment]
