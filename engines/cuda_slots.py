"""Double buffering on one CUDA device: slots that each own pinned host buffers, a stream and an event.

Shared by every CUDA engine (eager torch, compiled torch, TensorRT). A batch goes through one slot:
the uint8 images are copied into the slot's pinned input buffer, then on the slot's stream:
H2D (uint8, non_blocking) -> the engine's `compute` (normalize, model, argmax: uint8 masks on the
device) -> D2H into the slot's pinned output buffer (non_blocking) -> event. `result()` waits on
that event only: no device-wide synchronize in the steady state. A slot is reused round-robin; a
slot whose previous batch has not been collected copies that batch's masks out first, so nothing is
overwritten. Not thread-safe: one caller thread submits and collects.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engines.base import EngineBase, EngineError


class CudaSlot:
    """One in-flight batch's resources.

    index: the slot's number (engines keep per-slot state, e.g. a TensorRT execution context, in a
    list indexed by it). host_in/host_out: pinned uint8 (max_batch, H, W). stream: the slot's CUDA
    stream (`stream.cuda_stream` is its raw handle). done: recorded after the D2H copy.
    """

    def __init__(self, index: int, shape: tuple[int, int, int], device: torch.device) -> None:
        self.index = index
        self.host_in = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        self.host_out = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        self.stream = torch.cuda.Stream(device=device)
        self.done = torch.cuda.Event()
        self.pending: CudaInFlight | None = None

    def release(self) -> None:
        """Make the slot reusable: the pending batch (if any) copies its masks out first."""
        if self.pending is not None:
            self.pending.fetch()


#: compute(x, slot) -> masks: x is uint8 (n, H, W) on the device, already copied on slot.stream
#: (the current stream when compute runs); it returns uint8 (n, H, W) masks on the device,
#: enqueued on the same stream.
Compute = Callable[[torch.Tensor, CudaSlot], torch.Tensor]


class CudaSlots:
    """`count` slots on one CUDA device for batches of at most `max_batch` uint8 (H, W) images."""

    def __init__(
        self, device: torch.device, max_batch: int, height: int, width: int, label: str, count: int = 2
    ) -> None:
        if count < 1:
            raise EngineError(f"{label}: at least one batch must be allowed in flight, got {count} slots")
        self.device = device
        self.label = label
        shape = (max_batch, height, width)
        with torch.cuda.device(device):
            self._slots = [CudaSlot(i, shape, device) for i in range(count)]
        self._next = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self):
        return iter(self._slots)

    def submit(self, images: np.ndarray, compute: Compute) -> CudaInFlight:
        """Start one checked uint8 (n, H, W) batch on the next slot; returns its InFlight.

        RuntimeError raised while enqueuing (CUDA errors, out of memory) becomes EngineError.
        """
        if not self._slots:
            raise EngineError(f"{self.label}: engine is closed")
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        slot.release()  # the slot's previous batch: collect its masks before its buffers are reused
        n = images.shape[0]
        slot.host_in[:n].numpy()[...] = images
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(slot.stream), torch.inference_mode():
                x = slot.host_in[:n].to(self.device, non_blocking=True)
                masks = compute(x, slot)
                slot.host_out[:n].copy_(masks, non_blocking=True)
                slot.done.record(slot.stream)
        except RuntimeError as exc:
            raise EngineError(f"{self.label}: inference failed ({exc})") from exc
        flight = CudaInFlight(slot, n, self.label)
        slot.pending = flight
        return flight

    def close(self) -> None:
        """Collect every pending batch and drop the buffers and streams. Idempotent."""
        slots, self._slots = self._slots, []
        for slot in slots:
            try:
                slot.release()
            except EngineError:
                pass  # a failed batch's error belongs to its own result(); closing still proceeds


class CudaInFlight:
    """A batch on a CUDA slot; `result()` waits on the slot's event and returns uint8 (N, H, W)."""

    def __init__(self, slot: CudaSlot, n: int, label: str) -> None:
        self._slot: CudaSlot | None = slot
        self._n = n
        self._label = label
        self._masks: np.ndarray | None = None
        self._error: str | None = None

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
            self._error = str(exc)
            raise EngineError(f"{self._label}: inference failed ({exc})") from exc
        self._masks = slot.host_out[: self._n].numpy().copy()
        slot.pending = None

    def result(self) -> np.ndarray:
        """The batch's masks, uint8 (N, H, W); blocks until the GPU has finished it."""
        self.fetch()
        if self._masks is None:
            raise EngineError(f"{self._label}: batch failed earlier ({self._error or 'unknown error'})")
        return self._masks


def cuda_device(device: str, label: str) -> torch.device:
    """Parse "cuda" / "cuda:i" into a torch.device with an index; EngineError if unusable here."""
    if not device.startswith("cuda"):
        raise EngineError(f"{label}: device must be cuda or cuda:i, got {device!r}")
    if not torch.cuda.is_available():
        raise EngineError(f"{label}: device {device} requested but torch sees no CUDA device")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EngineError(f"{label}: bad device {device!r} ({exc})") from None
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise EngineError(f"{label}: {device} does not exist here ({torch.cuda.device_count()} CUDA device(s))")
    return torch.device("cuda", index)


class SlotEngine(EngineBase):
    """An engine that runs `_compute` on CudaSlots (compiled torch, TensorRT).

    A subclass sets `spec`, `name` and `_slots`, implements `_compute(x, slot)` (uint8 (N, H, W) on
    the device -> uint8 masks on the device, on the slot's stream) and `_release()`.
    """

    _slots: CudaSlots

    def _compute(self, x: torch.Tensor, slot: CudaSlot) -> torch.Tensor:
        raise NotImplementedError

    def _start(self, images: np.ndarray) -> CudaInFlight:
        return self._slots.submit(images, self._compute)
