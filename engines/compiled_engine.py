"""Compiled torch engine (`.ptc`): a U-Net checkpoint plus its torch.compile cache, in one file.

This module reads and runs a `.ptc`; `toolchain.compile.build_compiled` writes one. Both prepare
the model the same way (`prepare_module`, `compile_module`): each BatchNorm folded into the
convolution before it, FP16 weights, channels_last, and a wrapper so that the compiled graph takes
the uint8 (B, H, W) batch and returns uint8 masks (normalize and argmax are fused into the graph),
compiled with `torch.compile(mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)`
for each static batch size the file records. Smaller batches are padded to the smallest compiled
size that holds them.

CUDA graphs: plain "max-autotune" would add torch's own, which replay into static buffers shared
by every call, so two slots in flight on two streams would overwrite each other's outputs. Instead
the engine captures one CUDA graph per slot and compiled batch size, each with its own static input
and output (`cuda_graphs=True`, the default). A replay costs microseconds of CPU, where launching
the compiled kernels one by one took milliseconds of the worker's GIL per batch: on an H200 the
worker's threads, not the GPU, set its pace without them. A slot's graph is replayed again only
after that slot's previous masks were copied out (CudaSlot.release), so buffers are never shared.

File layout (torch.save of a dict, loadable with weights_only=True):
    {"format": "segqueue-compiled/1", "config", "state_dict", "spec": checkpoint fields (spec with
     precision fp16 and the compiled batch range), "compile": {"mode", "batch_sizes", "dynamic",
     "fold_batchnorm"}, "compile_cache": uint8 tensor of the artifact bytes, "built_with": {torch,
     triton, gpu, compute_capability, cuda, source, build_s, ...}}
At load the file must name this torch and triton version, GPU and compute capability (the cache is
only valid there); otherwise EngineError says how to rebuild it. CPU is refused: this engine is
CUDA only.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engines.base import DEFAULT_SLOTS, EngineError, EngineSpec, Normalization
from engines.checkpoint import Checkpoint, load_weights_only, require_format
from engines.cuda_slots import CudaSlot, CudaSlots, SlotEngine, cuda_device
from engines.torch_engine import normalize_tensor
from engines.unet import UNet, UNetConfig
from engines.versions import check_compatible, gpu_identity

FORMAT = "segqueue-compiled/1"
SUFFIX = ".ptc"
COMPILE_MODE = "max-autotune-no-cudagraphs"
#: built_with keys a compiled engine must match at load
SETUP_KEYS = ("torch", "triton", "gpu", "compute_capability")


def triton_version() -> str:
    """The triton version torch.compile uses here, or "absent"."""
    try:
        import triton
    except Exception:
        return "absent"
    return str(getattr(triton, "__version__", "unknown"))


def current_setup(device: str = "cuda") -> dict[str, str]:
    """{"torch", "triton", "gpu", "compute_capability"} of this process and CUDA device."""
    return {"torch": torch.__version__, "triton": triton_version(), **gpu_identity(device)}


def rebuild_hint(path: Path | str, built: dict[str, str]) -> str:
    """The command that rebuilds a compiled engine on this machine, from its recorded source."""
    source = built.get("source", "MODEL.pt")
    return f"Rebuild it on this machine: `engines build {source} --precision fp16 --compile -o {Path(path).name}`."


def check_compiled_setup(path: Path | str, built: dict[str, str], current: dict[str, str]) -> None:
    """Refuse a compiled engine built with another torch/triton version, GPU or compute capability."""
    check_compatible(path, built, current, rebuild_hint(path, built))


def fold_batchnorm_modules(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in an nn.Sequential into it.

    In place; returns the model. The folded conv computes conv + BN exactly (up to rounding).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in itertools.pairwise(children):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                setattr(module, name_a, fuse_conv_bn_eval(a, b))
                setattr(module, name_b, nn.Identity())
    return model


class MasksFromPixels(nn.Module):
    """uint8 (B, H, W) -> uint8 masks (B, H, W): FP16 normalize, channels_last U-Net, argmax."""

    def __init__(self, model: UNet, norm: Normalization) -> None:
        super().__init__()
        self.model = model
        self.norm = norm

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize_tensor(pixels.unsqueeze(1).to(torch.float16), self.norm)
        x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).argmax(dim=1).to(torch.uint8)


def prepare_module(ckpt: Checkpoint, device: torch.device) -> MasksFromPixels:
    """The checkpoint's model, BatchNorm folded, FP16, channels_last, wrapped for uint8 in and masks out."""
    model = fold_batchnorm_modules(ckpt.build_model())
    # Module.to takes memory_format (torch documents it); torch's overloads leave it out
    model = model.to(device, memory_format=torch.channels_last).half().eval()  # type: ignore[call-overload]
    return MasksFromPixels(model, ckpt.spec.normalization).eval()


def compile_module(module: nn.Module, batch_sizes: tuple[int, ...], spec: EngineSpec, device: torch.device):
    """torch.compile `module` the same way at build and at load, and run each batch size twice."""
    torch.backends.cudnn.benchmark = True
    compiled = torch.compile(module, mode=COMPILE_MODE, dynamic=False, fullgraph=True)
    with torch.cuda.device(device), torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randint(0, 256, (batch, spec.height, spec.width), dtype=torch.uint8, device=device)
            for _ in range(2):
                compiled(x)
        torch.cuda.synchronize(device)
    return compiled


@dataclass
class CompiledFile:
    """A read `.ptc`: checkpoint, spec, compile settings, recorded setup and the cache (uint8 tensor)."""

    path: Path
    checkpoint: Checkpoint
    spec: EngineSpec
    batch_sizes: tuple[int, ...]
    mode: str
    built_with: dict[str, str]
    compile_cache: torch.Tensor


def read_compiled(path: Path | str) -> CompiledFile:
    """Read a `.ptc` with torch.load(weights_only=True, mmap=True); EngineError naming the file if bad."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: compiled engine file not found")
    loaded = load_weights_only(path, "a readable compiled engine", mmap=True)
    data = require_format(path, loaded, FORMAT, f"{FORMAT} file")
    try:
        spec = EngineSpec.from_dict(data["spec"])
        config = UNetConfig.from_dict(data["config"])
        compile_info = data["compile"]
        sizes = tuple(int(b) for b in compile_info["batch_sizes"])
        cache = data["compile_cache"]
        built = {str(k): str(v) for k, v in data["built_with"].items()}
        if (not isinstance(cache, torch.Tensor) or cache.dtype != torch.uint8
                or not isinstance(data["state_dict"], dict)):
            raise TypeError("compile_cache must be a uint8 tensor and state_dict a dict")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineError(f"{path}: malformed compiled engine ({type(exc).__name__}: {exc})") from None
    ckpt = Checkpoint(path=path, config=config, state_dict=data["state_dict"], spec=spec)
    return CompiledFile(path, ckpt, spec, sizes, str(compile_info.get("mode", COMPILE_MODE)), built, cache)


class CompiledTorchEngine(SlotEngine):
    """A `.ptc` compiled U-Net on one CUDA device. `submit(uint8 (N, H, W))` -> InFlight of uint8 masks.

    Loading checks the recorded torch/triton versions and GPU, hot-loads the compile cache, compiles
    and warms every compiled batch size (seconds, not the build's minute). Batches smaller than a
    compiled size run padded to the smallest one that holds them. load_timings: seconds spent
    reading the file ("read_s"), loading the cache ("cache_load_s") and compiling + warming
    ("compile_warm_s"). slots: batches in flight (engines.cuda_slots; 2 by default), one CUDA graph each.
    """

    def __init__(self, path: Path | str, device: str = "cuda", cuda_graphs: bool = True,
                 slots: int = DEFAULT_SLOTS) -> None:
        self.path = Path(path)
        if not device.startswith("cuda"):
            raise EngineError(
                f"{self.path}: a compiled torch engine (.ptc) runs on CUDA only, not on {device!r}; on CPU load "
                "the checkpoint it was built from (.pt) or its ONNX export instead"
            )
        self.device = cuda_device(device, str(self.path))
        t0 = time.perf_counter()
        compiled_file = read_compiled(self.path)
        check_compiled_setup(self.path, compiled_file.built_with, current_setup(str(self.device)))
        t1 = time.perf_counter()
        blob = compiled_file.compile_cache.numpy().tobytes()
        torch.compiler.load_cache_artifacts(blob)
        del blob
        t2 = time.perf_counter()
        self.spec: EngineSpec = compiled_file.spec
        self.batch_sizes = compiled_file.batch_sizes
        self.name = f"compiled:{self.device} fp16 {self.path.name}"
        module = prepare_module(compiled_file.checkpoint, self.device)
        self._compiled = compile_module(module, self.batch_sizes, self.spec, self.device)
        self.load_timings = {"read_s": t1 - t0, "cache_load_s": t2 - t1, "compile_warm_s": time.perf_counter() - t2}
        self._slots = CudaSlots(self.device, self.spec.max_batch, self.spec.height, self.spec.width, self.name,
                                count=slots)
        self.slots = slots
        with torch.cuda.device(self.device):  # per slot, one padded input per compiled size
            shape = (self.spec.height, self.spec.width)
            self._pads = [
                {b: torch.zeros((b, *shape), dtype=torch.uint8, device=self.device) for b in self.batch_sizes}
                for _ in range(len(self._slots))
            ]
            torch.cuda.synchronize(self.device)
        self._graphs: list[dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = []
        self.cuda_graphs_error: str | None = None  # why capture failed, if it did (kernels are then launched)
        if cuda_graphs:
            try:
                self._graphs = [self._capture(slot) for slot in self._slots]
                self.name += " +graphs"
            except RuntimeError as exc:
                self._graphs = []
                self.cuda_graphs_error = f"{type(exc).__name__}: {exc}".splitlines()[0]

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether batches replay per-slot CUDA graphs (else the compiled kernels are launched one by one)."""
        return bool(self._graphs)

    def _capture(self, slot: CudaSlot) -> dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
        """One CUDA graph per compiled batch size for this slot: input is the slot's padded buffer, output static."""
        graphs = {}
        with torch.cuda.device(self.device), torch.inference_mode():
            with torch.cuda.stream(slot.stream):  # warm up on the capture stream (cuBLAS/cuDNN handles, workspaces)
                for rows in self.batch_sizes:
                    for _ in range(3):
                        self._compiled(self._pads[slot.index][rows])
            torch.cuda.synchronize(self.device)
            for rows in self.batch_sizes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=slot.stream):
                    out = self._compiled(self._pads[slot.index][rows])
                graphs[rows] = (graph, out)
            torch.cuda.synchronize(self.device)
        return graphs

    def _compute(self, x: torch.Tensor, slot: CudaSlot) -> torch.Tensor:
        n = x.shape[0]
        rows = next(b for b in self.batch_sizes if b >= n)
        padded = self._pads[slot.index][rows]  # rows n.. keep stale pixels: their masks are dropped
        if self._graphs:
            padded[:n].copy_(x)
            graph, out = self._graphs[slot.index][rows]
            graph.replay()
            return out[:n]
        if rows == n:
            return self._compiled(x)
        padded[:n].copy_(x)
        return self._compiled(padded)[:n]

    def _release(self) -> None:
        self._slots.close()
        self._graphs = []
        self._pads = []
        self._compiled = None
