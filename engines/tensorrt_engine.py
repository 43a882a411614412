"""TensorRT engine: a serialized plan run with TensorRT 10.x/11.x named-tensor API on torch's CUDA memory.

No pycuda: torch owns the CUDA context, memory and streams. Each of the two slots
(engines.cuda_slots) has its own execution context, its own device input/output tensors (torch),
its stream and event. On the slot's stream: H2D uint8 -> normalize into the input tensor (in the
plan's input dtype) -> `context.execute_async_v3(stream)` -> argmax -> uint8 -> D2H -> event.

A plan only runs on the TensorRT version and GPU that built it, so at load the plan's metadata
(`<plan>.json`, written by toolchain.tensorrt_build) must name this TensorRT version, GPU name and
compute capability, and its input size and batch range must agree with the plan itself; otherwise
EngineError says what to rebuild. This module imports without TensorRT; `tensorrt` is imported when
an engine is opened.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from engines.base import DEFAULT_SLOTS, EngineError, EngineSpec
from engines.cuda_slots import CudaSlot, CudaSlots, SlotEngine, cuda_device
from engines.torch_engine import normalize_tensor
from engines.versions import check_compatible, gpu_identity

#: built_with keys a plan must match at load
PLAN_KEYS = ("tensorrt", "gpu", "compute_capability")


def import_tensorrt() -> ModuleType:
    """`import tensorrt`, or EngineError "TensorRT is not installed here: `import tensorrt` failed (...)"."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
        raise EngineError(
            f"TensorRT is not installed here: `import tensorrt` failed ({type(exc).__name__}: {exc}); "
            "install TensorRT 10.x/11.x for this CUDA version, or use the .onnx or .pt engine"
        ) from None
    return tensorrt


_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def trt_logger(trt: Any):
    """The process's one TensorRT logger; it keeps the last 50 warnings/errors for error messages."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:

            class _Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.messages: collections.deque[str] = collections.deque(maxlen=50)

                def log(self, severity, msg) -> None:  # called by TensorRT
                    if int(severity) <= int(trt.ILogger.Severity.WARNING):
                        self.messages.append(f"{getattr(severity, 'name', severity)}: {msg}")

                def recent(self, n: int = 5) -> str:
                    return " | ".join(list(self.messages)[-n:]) or "no message from TensorRT"

            _LOGGER = _Logger()
        return _LOGGER


def torch_dtype(trt: ModuleType, dtype) -> torch.dtype:
    """torch dtype of a TensorRT tensor dtype (float32, float16, bfloat16, int8, int32, int64, uint8, bool)."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
             "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool}
    for name, tdtype in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return tdtype
    raise EngineError(f"TensorRT tensor dtype {dtype} has no torch equivalent")


def rebuild_hint(path: Path | str, spec: EngineSpec) -> str:
    """What to run to rebuild a plan on this machine, from its metadata's source ONNX."""
    source = spec.built_with.get("source", "MODEL.onnx")
    return f"Rebuild the plan on this machine: `engines build {source} -o {Path(path).name}`."


def current_setup(trt_version: str, device: str = "cuda") -> dict[str, str]:
    """{"tensorrt", "gpu", "compute_capability"} of this process and CUDA device."""
    return {"tensorrt": trt_version, **gpu_identity(device)}


def check_plan_metadata(path: Path | str, spec: EngineSpec, current: dict[str, str]) -> None:
    """Refuse a plan whose metadata names another TensorRT version, GPU or compute capability."""
    check_compatible(path, spec.built_with, current, rebuild_hint(path, spec))


def check_plan_shape(
    path: Path | str, spec: EngineSpec, input_shape: Sequence[int], batch_range: tuple[int, int], classes: int | None
) -> None:
    """Refuse a plan whose input (N, C, H, W) or batch range disagrees with its metadata.

    input_shape: the plan's input dims (-1 for the dynamic batch). batch_range: (min, max) batch
    of its optimization profile. classes: channels of its output (None: unknown).
    """
    hint = rebuild_hint(path, spec)
    if len(input_shape) != 4:
        raise EngineError(f"{path}: plan input must be NCHW, got shape {tuple(input_shape)}. {hint}")
    wanted = (spec.channels, spec.height, spec.width)
    for got, want, what in zip(input_shape[1:], wanted, ("channels", "height", "width"), strict=True):
        if got != want:
            raise EngineError(f"{path}: plan input {what} is {got}, its metadata says {want}. {hint}")
    low, high = batch_range
    if not (low <= spec.min_batch and spec.max_batch <= high):
        raise EngineError(
            f"{path}: plan accepts batches {low}..{high}, its metadata says {spec.min_batch}..{spec.max_batch}. {hint}"
        )
    if classes is not None and classes != spec.classes:
        raise EngineError(f"{path}: plan outputs {classes} classes, its metadata says {spec.classes}. {hint}")


class TensorRTEngine(SlotEngine):
    """Runs a TensorRT plan on one CUDA device. `submit(uint8 (N, H, W))` -> InFlight of uint8 masks.

    path: the plan (.trt/.engine/.plan) with `<plan>.json` beside it. device: "cuda" or "cuda:i".
    For engines that come from elsewhere (torch2trt files) pass engine_bytes, spec and the tensor
    names; the version/GPU check is then skipped (nothing records them) and TensorRT's own
    deserialization check applies; rebuild says what to do if it fails; infer_shapes=True takes
    the spec's input name, size, classes and batch range from the engine itself (no metadata
    file). slots: batches in flight (2 by default), each with its own execution context.
    """

    def __init__(
        self,
        path: Path | str,
        device: str = "cuda",
        *,
        engine_bytes: bytes | None = None,
        spec: EngineSpec | None = None,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        rebuild: str | None = None,
        infer_shapes: bool = False,
        slots: int = DEFAULT_SLOTS,
    ) -> None:
        self.path = Path(path)
        self.slots = slots
        trt = import_tensorrt()
        self._trt = trt
        self.device = cuda_device(device, str(self.path))
        if engine_bytes is None:
            if not self.path.is_file():
                raise EngineError(f"{self.path}: TensorRT plan file not found")
            spec = EngineSpec.read_beside(self.path)
            check_plan_metadata(self.path, spec, current_setup(trt.__version__, str(self.device)))
            engine_bytes = self.path.read_bytes()
            self._rebuild = rebuild_hint(self.path, spec)
        elif spec is None:
            raise EngineError(f"{self.path}: engine bytes given without a spec")
        else:
            self._rebuild = rebuild or "Rebuild it with this TensorRT version on this GPU."
        self.spec: EngineSpec = spec
        self._infer_shapes = infer_shapes
        logger = trt_logger(trt)
        with torch.cuda.device(self.device):
            torch.cuda.init()  # torch creates the primary context first; TensorRT then uses it
            self._runtime = trt.Runtime(logger)
            self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self._engine is None:
                raise EngineError(
                    f"{self.path}: TensorRT {trt.__version__} cannot deserialize this engine ({logger.recent()}). "
                    f"{self._rebuild}"
                )
            self._input, self._output = self._io_names(input_names, output_names)
            self._check_shapes()
            self._in_dtype = torch_dtype(trt, self._engine.get_tensor_dtype(self._input))
            self._out_dtype = torch_dtype(trt, self._engine.get_tensor_dtype(self._output))
            spec = self.spec
            self.name = f"tensorrt:{self.device} {spec.precision} {self.path.name}"
            self._slots = CudaSlots(self.device, self._rows, spec.height, spec.width, self.name, count=self.slots)
            self._contexts: list[Any] = []
            self._inputs: list[torch.Tensor] = []
            self._outputs: list[torch.Tensor] = []
            self._shapes: list[int] = []
            for _ in range(self.slots):
                self._add_slot_resources()
            torch.cuda.synchronize(self.device)  # once, at load

    # -- load ------------------------------------------------------------------------------------
    def _io_names(self, input_names, output_names) -> tuple[str, str]:
        """The plan's one input and one output tensor name (checked against the given names)."""
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{self.path}: expected one input and one output tensor, plan has {inputs} and {outputs}")
        for given, found, what in ((input_names, inputs, "input"), (output_names, outputs, "output")):
            if given is not None and list(given) != found:
                raise EngineError(f"{self.path}: {what} names {list(given)} do not match the plan's {found}")
        if input_names is None and not self._infer_shapes and inputs[0] != self.spec.input_name:
            raise EngineError(
                f"{self.path}: plan input {inputs[0]!r} != metadata input {self.spec.input_name!r}. {self._rebuild}"
            )
        return inputs[0], outputs[0]

    def _check_shapes(self) -> None:
        engine = self._engine
        shape = tuple(engine.get_tensor_shape(self._input))
        if len(shape) == 4 and shape[0] == -1:
            low, _, high = (tuple(s) for s in engine.get_tensor_profile_shape(self._input, 0))
            batch_range = (low[0], high[0])
            self._static_batch = False
        else:  # a fixed batch (older torch2trt engines): smaller batches run padded to it
            batch_range = (1, shape[0] if shape else 0)
            self._static_batch = True
        out_shape = tuple(engine.get_tensor_shape(self._output))
        classes = out_shape[1] if len(out_shape) == 4 and out_shape[1] > 0 else None
        if self._infer_shapes and len(shape) == 4:
            self.spec = replace(
                self.spec, input_name=self._input, channels=shape[1], height=shape[2], width=shape[3],
                classes=classes or self.spec.classes, min_batch=batch_range[0], max_batch=batch_range[1],
            )
        check_plan_shape(self.path, self.spec, shape, batch_range, classes)
        self._rows = batch_range[1] if self._static_batch else self.spec.max_batch

    def _add_slot_resources(self) -> None:
        spec = self.spec
        context = self._engine.create_execution_context()
        if context is None:
            raise EngineError(
                f"{self.path}: cannot create a TensorRT execution context ({trt_logger(self._trt).recent()})"
            )
        inp = torch.empty((self._rows, spec.channels, spec.height, spec.width), dtype=self._in_dtype,
                          device=self.device)
        out = torch.empty((self._rows, spec.classes, spec.height, spec.width), dtype=self._out_dtype,
                          device=self.device)
        # a slice [:n] of these starts at the same address: set once, only the input shape changes
        context.set_tensor_address(self._input, inp.data_ptr())
        context.set_tensor_address(self._output, out.data_ptr())
        self._contexts.append(context)
        self._inputs.append(inp)
        self._outputs.append(out)
        self._shapes.append(0)

    # -- run -------------------------------------------------------------------------------------
    def _compute(self, x: torch.Tensor, slot: CudaSlot) -> torch.Tensor:
        """uint8 (n, H, W) on the device -> uint8 masks (n, H, W), all on the slot's stream."""
        i, n = slot.index, x.shape[0]
        context, inp, out = self._contexts[i], self._inputs[i], self._outputs[i]
        inp[:n].copy_(normalize_tensor(x.unsqueeze(1).to(self._in_dtype), self.spec.normalization))
        rows = self._rows if self._static_batch else n
        if self._shapes[i] != rows:
            if not context.set_input_shape(self._input, (rows, self.spec.channels, self.spec.height, self.spec.width)):
                raise EngineError(f"{self.name}: plan refuses batch {rows} ({trt_logger(self._trt).recent()})")
            self._shapes[i] = rows
        if not context.execute_async_v3(slot.stream.cuda_stream):
            raise EngineError(f"{self.name}: execute_async_v3 failed ({trt_logger(self._trt).recent()})")
        return out[:n].argmax(dim=1).to(torch.uint8)

    def _release(self) -> None:
        self._slots.close()
        self._contexts.clear()  # contexts before their engine, the engine before its runtime
        self._inputs.clear()
        self._outputs.clear()
        self._engine = None
        self._runtime = None
