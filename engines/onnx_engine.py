"""ONNX Runtime engine: an FP32 (or Q/DQ INT8) ONNX U-Net with its `<file>.onnx.json` metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.base import EngineBase, EngineError, EngineSpec, Normalization
from engines.runner import BackgroundRunner


def normalize_array(images: np.ndarray, norm: Normalization) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W): (pixel * scale - mean) / std."""
    x = images.astype(np.float32)[:, None]
    x *= np.float32(norm.scale)
    if norm.mean:
        x -= np.float32(norm.mean)
    if norm.std != 1.0:
        x /= np.float32(norm.std)
    return x


class OnnxEngine(EngineBase):
    """Runs an ONNX model through onnxruntime on one background thread.

    path: the .onnx file; its metadata must sit beside it (`unet.onnx.json`). device: "cpu" or
    "cuda[:i]" (needs onnxruntime-gpu). `submit(uint8 (N, H, W))` returns a Future whose `result()`
    is the uint8 (N, H, W) class masks. slots = 2: one batch computing, one queued.
    """

    def __init__(self, path: Path | str, device: str = "cpu") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: ONNX file not found")
        self.spec: EngineSpec = EngineSpec.read_beside(self.path)
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError(
                    f"{self.path}: device {device} needs onnxruntime's CUDAExecutionProvider, which is not "
                    "installed (pip install onnxruntime-gpu), or use device cpu"
                )
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        elif device != "cpu":
            raise EngineError(f"{self.path}: unknown device {device!r} (use cpu or cuda[:i])")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).strip()[:300]})") from None
        self._check_graph()
        self._output = self._session.get_outputs()[0].name
        self.device = device
        self.name = f"onnxruntime:{device} {self.spec.precision} {self.path.name}"
        self._runner = BackgroundRunner(self._run, self.name)

    def _check_graph(self) -> None:
        """Refuse a model whose input name, channels or size disagree with its metadata."""
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != self.spec.input_name:
            names = [i.name for i in inputs]
            raise EngineError(f"{self.path}: model inputs {names} != metadata input {self.spec.input_name!r}")
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise EngineError(f"{self.path}: model input must be NCHW, got shape {shape}")
        want = [self.spec.channels, self.spec.height, self.spec.width]
        for got, expected, what in zip(shape[1:], want, ("channels", "height", "width"), strict=True):
            if isinstance(got, int) and got != expected:
                raise EngineError(f"{self.path}: model input {what} is {got}, metadata says {expected}")

    def _run(self, images: np.ndarray) -> np.ndarray:
        x = normalize_array(images, self.spec.normalization)
        logits = self._session.run([self._output], {self.spec.input_name: x})[0]
        return np.argmax(logits, axis=1).astype(np.uint8)

    def _start(self, images: np.ndarray):
        return self._runner.submit(images)

    def _release(self) -> None:
        self._runner.close()
        self._session = None
