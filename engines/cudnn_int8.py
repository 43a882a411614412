"""cuDNN INT8 engine (`.cudnn`): the INT8 Q/DQ U-Net on a GPU through cuDNN's graph API, no TensorRT needed.

The file (engines/int8_plan.py) holds the quantized layers read from the INT8 Q/DQ ONNX, the
precision chosen for each layer and the cuDNN plan chosen for each layer and batch size, all
measured on the GPU that built it (toolchain/cudnn_build.py). This module runs it:

    pixels uint8 (N, H, W) -> 256-entry table -> int8 input (NHWC)
    each conv: one cuDNN graph, conv (INT8 x INT8 -> INT32, or FP16 -> FP32) -> * S[c] + B[c]
               -> ReLU -> INT8 output (NHWC); FP16 layers first widen their INT8 input to FP16
    each upconv: FP16 1x1 cuDNN graph to 4 x Cout channels (the 2x2 stride-2 transposed conv as a
               GEMM), INT8 output scattered into the concat buffer's channel slice
    pool: 2x2 max on INT8, writing the skip's copy (requantized where its scale differs) into the
          concat buffer in the same pass; concat: copies whatever no pool or upconv wrote
    (those steps are engines.int8_glue: Triton kernels on CUDA, or torch ops with SEGQ_INT8_GLUE=torch)
    head: INT8 1x1 graph (output channels padded to 16), argmax -> uint8 masks

Every activation lives in a buffer owned by its slot (engines.cuda_slots: two slots in flight by default, each
with its stream, cuDNN handle and workspace). The whole forward pass of each batch size is captured
once per slot as a CUDA graph and replayed per batch; smaller batches run padded to the smallest
captured size that holds them. Plans are rebuilt at load from the recorded (engine id, knobs), so
no heuristic search or timing happens when a worker starts.

`nvidia-cudnn-frontend` (the `cuda-int8` extra) drives cuDNN; it must find the cuDNN major version
torch loaded. The file is refused on another GPU model or cuDNN major version.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.base import DEFAULT_SLOTS, EngineError
from engines.cuda_slots import CudaSlot, CudaSlots, SlotEngine, cuda_device
from engines.int8_glue import Glue, copy_requantized, select_glue
from engines.int8_plan import Int8Plan, Layer, load_plan
from engines.versions import check_compatible, gpu_identity, package_version

#: channel multiples cuDNN's fused INT8 and FP16 conv kernels need on SM90
CHANNEL_MULTIPLE = {"int8": 16, "fp16": 8}


def import_cudnn() -> Any:
    """The `cudnn` module of nvidia-cudnn-frontend, checked against the cuDNN torch loaded.

    EngineError with the install command if it is missing, or if its cuDNN major version is not torch's.
    """
    try:
        import cudnn
    except ImportError as exc:
        raise EngineError(
            "the cuDNN INT8 engine needs nvidia-cudnn-frontend: pip install 'segqueue[cuda-int8]' "
            f"(or pip install --no-deps nvidia-cudnn-frontend) on the GPU host ({exc})"
        ) from None
    torch_major = (torch.backends.cudnn.version() or 0) // 10000
    backend = int(cudnn.backend_version())
    if torch_major and backend // 10000 != torch_major:
        raise EngineError(f"nvidia-cudnn-frontend found cuDNN {cudnn.backend_version_string()}, torch loads cuDNN "
                          f"{torch.backends.cudnn.version()}: install a frontend that uses torch's cuDNN")
    return cudnn


def current_setup(device: str) -> dict[str, str]:
    """What a `.cudnn` file must match here: GPU model, compute capability, cuDNN major version."""
    cudnn = import_cudnn()
    return {**gpu_identity(device), "cudnn_major": str(int(cudnn.backend_version()) // 10000)}


def setup_record(device: str) -> dict[str, str]:
    """Everything worth recording about the build machine (current_setup plus exact versions)."""
    cudnn = import_cudnn()
    return {**current_setup(device), "cudnn": cudnn.backend_version_string(), "torch": torch.__version__,
            "cudnn_frontend": package_version("nvidia-cudnn-frontend")}


def nchw(t: torch.Tensor) -> torch.Tensor:
    """An (N, H, W, C) tensor as the (N, C, H, W) view cuDNN describes (NHWC strides)."""
    return t.permute(0, 3, 1, 2)


def padded(channels: int, precision: str) -> int:
    """`channels` rounded up to the multiple the precision's kernels need."""
    m = CHANNEL_MULTIPLE[precision]
    return -(-channels // m) * m


def requantize_table(ratio: float, device: torch.device) -> torch.Tensor:
    """int8 (256,): entry b is clamp(round(q * ratio)) for the int8 q whose bit pattern is b.

    The same float32 arithmetic as rounding each value, computed once for the 256 possible inputs.
    """
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).float()
    return torch.round(values * ratio).clamp_(-128, 127).to(torch.int8).to(device)


@dataclass
class LayerWeights:
    """A conv/upconv layer's device operands: weight (NCHW view of NHWC storage), scale and bias (1, C, 1, 1)."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    cin: int  # input channels as the graph sees them (padded)
    cout: int  # output channels as the graph writes them (padded; 4 x Cout for an upconv)


def layer_weights(plan: Int8Plan, layer: Layer, precision: str, device: torch.device) -> LayerWeights:
    """Upload one layer's weights in the layout and precision its cuDNN graph takes."""
    scale, bias = plan.epilogue(layer)
    if layer.kind == "upconv":  # (Cin, Cout, 2, 2) -> 1x1 GEMM weight (4*Cout, Cin): row (a*2 + b)*Cout + co
        w = plan.upconv_weight(layer)
        cin, cout = w.shape[0], w.shape[1]
        weight = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(4 * cout, cin))[:, None, None, :]
        scale, bias = np.tile(scale, 4), np.tile(bias, 4)
        dtype = np.dtype(np.float16)
    else:
        assert layer.weight is not None
        cout, cin, k, _ = layer.weight.shape
        cin_p, cout_p = padded(cin, precision), padded(cout, "int8") if layer.kernel == 1 else cout
        weight = np.zeros((cout_p, k, k, cin_p), np.float16 if precision == "fp16" else np.int8)
        weight[:cout, :, :, :cin] = layer.weight.transpose(0, 2, 3, 1)
        scale = np.concatenate([scale, np.ones(cout_p - cout, np.float32)])
        bias = np.concatenate([bias, np.zeros(cout_p - cout, np.float32)])
        dtype = weight.dtype
    w_dev = torch.from_numpy(np.ascontiguousarray(weight.astype(dtype))).to(device)
    s_dev = torch.from_numpy(scale.astype(np.float32)).to(device).view(1, 1, 1, -1)
    b_dev = torch.from_numpy(bias.astype(np.float32)).to(device).view(1, 1, 1, -1)
    return LayerWeights(nchw(w_dev), nchw(s_dev), nchw(b_dev), w_dev.shape[3], w_dev.shape[0])


class ConvGraph:
    """One conv (or upconv GEMM) at one batch size as a cuDNN graph: x (int8 or fp16) -> int8 y, fused epilogue.

    x, y: NCHW views (NHWC strides) of the buffers it will run on, used as templates: every later
    call must pass tensors of the same shape and strides. recipe: {"engine", "knobs"} from an
    earlier autotune (replayed without any search); None builds every heuristic plan, for `autotune`.
    """

    def __init__(self, cudnn: Any, handle: Any, x: torch.Tensor, weights: LayerWeights, y: torch.Tensor,
                 precision: str, kernel: int, relu: bool, recipe: dict[str, Any] | None) -> None:
        dt = cudnn.data_type
        self.cudnn = cudnn
        g = cudnn.pygraph(io_data_type=dt.INT8 if precision == "int8" else dt.HALF,
                          intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT, handle=handle)
        self.x, self.w = g.tensor_like(x), g.tensor_like(weights.weight)
        self.s, self.b = g.tensor_like(weights.scale), g.tensor_like(weights.bias)
        pad = kernel // 2
        conv = g.conv_fprop(image=self.x, weight=self.w, padding=[pad, pad], stride=[1, 1], dilation=[1, 1],
                            compute_data_type=dt.INT32 if precision == "int8" else dt.FLOAT)
        conv.set_data_type(dt.FLOAT)
        v = g.add(g.mul(conv, self.s, compute_data_type=dt.FLOAT), self.b, compute_data_type=dt.FLOAT)
        if relu:
            v = g.relu(input=v, compute_data_type=dt.FLOAT)
        v.set_output(True)
        v.set_data_type(dt.INT8)
        v.set_dim(list(y.shape))  # the buffer's own layout (NHWC), not one cuDNN would infer
        v.set_stride(list(y.stride()))
        self.y = v
        self.weights = weights
        self.graph = g
        g.validate()
        g.build_operation_graph()
        if recipe is None:
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B])
            g.check_support()
            g.build_plans(cudnn.build_plan_policy.ALL)
        else:
            knobs = {cudnn.knob_type(int(k)): int(v) for k, v in recipe["knobs"].items()}
            g.create_execution_plan(int(recipe["engine"]), knobs)
            g.check_support()
            g.build_plans()

    def pack(self, x: torch.Tensor, y: torch.Tensor) -> dict[Any, torch.Tensor]:
        """The variant pack for input view x and output view y."""
        w = self.weights
        return {self.x: x, self.w: w.weight, self.s: w.scale, self.b: w.bias, self.y: y}

    def workspace_size(self) -> int:
        """Bytes of workspace the selected plan needs."""
        return int(self.graph.get_workspace_size())

    def run(self, handle: Any, x: torch.Tensor, y: torch.Tensor, workspace: torch.Tensor) -> None:
        """Enqueue the graph on the handle's stream."""
        self.graph.execute(self.pack(x, y), workspace, handle=handle)

    def autotune(self, handle: Any, x: torch.Tensor, y: torch.Tensor, workspace_limit: int,
                 timer: Callable[[Callable[[], None]], float]) -> tuple[float, dict[str, Any]]:
        """Time every built plan on x -> y; select the fastest. Returns (ms, {"engine", "knobs", "name"})."""
        g, pack = self.graph, self.pack(x, y)
        best, best_index = float("inf"), -1
        for index in range(g.get_execution_plan_count()):
            try:
                need = int(g.get_workspace_size_plan_at_index(index))
                if need > workspace_limit:
                    continue
                ws = torch.empty(max(need, 1), dtype=torch.uint8, device=x.device)
                ms = timer(functools.partial(g.execute_plan_at_index, pack, ws, index=index, handle=handle))
            except Exception:  # a plan that fails to run is skipped, as cuDNN's own autotuner does
                continue
            if ms < best:
                best, best_index = ms, index
        if best_index < 0:
            raise EngineError("no cuDNN plan ran for this layer")
        engine, knobs = g.get_engine_and_knobs_at_index(best_index)
        g.build_plan_at_index(best_index)
        try:
            name = str(g.get_plan_name_at_index(best_index))
        except Exception:  # older frontends have no plan names
            name = ""
        return best, {"engine": int(engine), "knobs": {str(int(k)): int(v) for k, v in knobs.items()}, "name": name}


@dataclass
class SlotBuffers:
    """One slot's device memory at the largest batch: pixels, every activation, masks, workspace."""

    pixels: torch.Tensor  # uint8 (B, H, W)
    masks: torch.Tensor  # uint8 (B, H, W)
    acts: dict[str, torch.Tensor]  # int8 (B, h, w, C) per tensor (views into concat buffers for upconvs)
    wide: dict[str, torch.Tensor]  # padded / FP16 inputs per layer name
    gemm: dict[str, torch.Tensor]  # int8 (B, h, w, 4*C) upconv GEMM outputs
    workspace: torch.Tensor = field(default_factory=lambda: torch.empty(0))


class PlanRunner:
    """A plan's weights on one device and its cuDNN graphs for each batch size; runs a forward pass on buffers."""

    def __init__(self, plan: Int8Plan, device: torch.device, cudnn: Any, glue: str = "auto") -> None:
        self.plan = plan
        self.device = device
        self.cudnn = cudnn
        self.glue: Glue = select_glue(device, glue)
        self.table = torch.from_numpy(plan.input_table()).to(device)
        self.weights: dict[str, LayerWeights] = {}
        self.graphs: dict[tuple[str, int], ConvGraph] = {}
        self.upconv_target = {}  # upconv output name -> concat output name whose channel slice it fills
        for layer in plan.layers:
            if layer.kind == "concat":
                for index, source in enumerate(layer.sources):
                    producer = self._producer(source)
                    if producer is not None and producer.kind == "upconv":
                        self.upconv_target[source] = (layer.output, index)
        self.requantize = self.requantize_tables()
        self.skip_copied_by_pool = self.pooled_skips()
        self.upload_weights()

    def requantize_tables(self) -> dict[str, torch.Tensor]:
        """Per concat input whose scale differs from the concat's: its 256-entry requantization table."""
        tables = {}
        for layer in self.plan.layers:
            if layer.kind != "concat":
                continue
            s_out = np.float32(self.plan.tensor(layer.output).scale)
            for source in layer.sources:
                s_in = np.float32(self.plan.tensor(source).scale)
                if source not in self.upconv_target and s_in != s_out:
                    tables[source] = requantize_table(float(s_in / s_out), self.device)
        return tables

    def pooled_skips(self) -> dict[str, tuple[str, int]]:
        """Skip tensors that a pool reads before a concat copies them: name -> (concat output, channel offset).

        The pool step writes their concat slice too (one read of the skip instead of two)."""
        copied: dict[str, tuple[str, int]] = {}
        pooled_at = {layer.sources[0]: index for index, layer in enumerate(self.plan.layers) if layer.kind == "pool"}
        for index, layer in enumerate(self.plan.layers):
            if layer.kind != "concat":
                continue
            offset = 0
            for source in layer.sources:
                if source not in self.upconv_target and pooled_at.get(source, index) < index:
                    copied[source] = (layer.output, offset)
                offset += self.plan.tensor(source).channels
        return copied

    def _producer(self, name: str) -> Layer | None:
        return next((layer for layer in self.plan.layers if layer.output == name), None)

    def upload_weights(self) -> None:
        """(Re)upload every conv/upconv layer's weights for its current precision."""
        for layer in self.plan.layers:
            if layer.kind in ("conv", "upconv"):
                self.weights[layer.name] = layer_weights(self.plan, layer, layer.precision, self.device)

    def tensor_shape(self, name: str, batch: int, channels: int | None = None) -> tuple[int, int, int, int]:
        """(batch, h, w, C) of a plan tensor's NHWC buffer (C: its channels unless given)."""
        t, spec = self.plan.tensor(name), self.plan.spec
        return batch, spec.height // t.downscale, spec.width // t.downscale, channels or t.channels

    def layer_scratch(self, layer: Layer, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A conv/upconv layer's own buffers at `batch` images: what its graph writes (the INT8 output, or an
        upconv's (B, h, w, 4*C) GEMM output) and its widened/padded input, if its precision needs one."""
        weights, source, dev = self.weights[layer.name], layer.sources[0], self.device
        if layer.kind == "upconv":
            out = torch.zeros(self.tensor_shape(source, batch, weights.cout), dtype=torch.int8, device=dev)
            return out, torch.zeros(self.tensor_shape(source, batch), dtype=torch.float16, device=dev)
        out = torch.zeros(self.tensor_shape(layer.output, batch, weights.cout), dtype=torch.int8, device=dev)
        if layer.precision != "fp16" and weights.cin == self.plan.tensor(source).channels:
            return out, None
        dtype = torch.float16 if layer.precision == "fp16" else torch.int8
        return out, torch.zeros(self.tensor_shape(source, batch, weights.cin), dtype=dtype, device=dev)

    def allocate(self, batch: int) -> SlotBuffers:
        """Buffers for batches of up to `batch` images (one slot's worth)."""
        spec, plan, dev = self.plan.spec, self.plan, self.device
        acts: dict[str, torch.Tensor] = {}
        gemm: dict[str, torch.Tensor] = {}
        wide: dict[str, torch.Tensor] = {}
        acts[plan.input_tensor] = torch.zeros(self.tensor_shape(plan.input_tensor, batch), dtype=torch.int8,
                                              device=dev)
        for layer in plan.layers:
            if layer.kind in ("conv", "upconv"):
                out, widened = self.layer_scratch(layer, batch)
                (gemm if layer.kind == "upconv" else acts)[layer.output] = out
                if widened is not None:
                    wide[layer.name] = widened
            else:
                acts[layer.output] = torch.zeros(self.tensor_shape(layer.output, batch), dtype=torch.int8, device=dev)
        for up, (cat, index) in self.upconv_target.items():
            producer = self._producer(cat)
            if producer is None:
                raise EngineError(f"cuDNN plan: no layer writes {cat}, which {up} is written into")
            offset = sum(plan.tensor(s).channels for s in producer.sources[:index])
            acts[up] = acts[cat][..., offset:offset + plan.tensor(up).channels]
        pixels = torch.zeros((batch, spec.height, spec.width), dtype=torch.uint8, device=dev)
        masks = torch.zeros_like(pixels)
        return SlotBuffers(pixels, masks, acts, wide, gemm)

    def graph_input(self, layer: Layer, bufs: SlotBuffers, n: int) -> torch.Tensor:
        """The NCHW view a layer's cuDNN graph reads (its widened/padded buffer if it has one)."""
        source = bufs.wide.get(layer.name, bufs.acts[layer.sources[0]])
        return nchw(source[:n])

    def graph_output(self, layer: Layer, bufs: SlotBuffers, n: int) -> torch.Tensor:
        """The NCHW view a layer's cuDNN graph writes."""
        if layer.kind == "upconv":
            return nchw(bufs.gemm[layer.output][:n])
        return nchw(bufs.acts[layer.output][:n])

    def build_graph(self, layer: Layer, batch: int, handle: Any, bufs: SlotBuffers,
                    recipe: dict[str, Any] | None) -> ConvGraph:
        """The cuDNN graph of one conv/upconv layer at one batch size (templates from `bufs`)."""
        kernel = 1 if layer.kind == "upconv" else layer.kernel
        precision = "fp16" if layer.kind == "upconv" else layer.precision
        return ConvGraph(self.cudnn, handle, self.graph_input(layer, bufs, batch), self.weights[layer.name],
                         self.graph_output(layer, bufs, batch), precision, kernel, layer.relu, recipe)

    def build_all(self, handle: Any, bufs: SlotBuffers) -> None:
        """Build every layer's graph at every batch size from the plan's recorded recipes."""
        for batch in self.plan.batch_sizes:
            for layer in self.plan.layers:
                if layer.kind in ("conv", "upconv"):
                    recipe = layer.plans.get(str(batch))
                    self.graphs[(layer.name, batch)] = self.build_graph(layer, batch, handle, bufs, recipe)

    def workspace_size(self) -> int:
        """The largest workspace any graph needs, in bytes."""
        return max((g.workspace_size() for g in self.graphs.values()), default=0)

    def prepare_input(self, layer: Layer, bufs: SlotBuffers, n: int) -> None:
        """Widen (to FP16) or channel-pad the layer's INT8 input into its graph's input buffer."""
        wide = bufs.wide.get(layer.name)
        if wide is not None:
            source = bufs.acts[layer.sources[0]][:n]
            wide[:n, ..., :source.shape[-1]].copy_(source)

    def run_layer(self, layer: Layer, bufs: SlotBuffers, n: int, handle: Any) -> None:
        """Enqueue one layer for the first n images of the slot's buffers."""
        if layer.kind == "pool":
            self.run_pool(layer, bufs, n)
        elif layer.kind == "concat":
            self.run_concat(layer, bufs, n)
        else:
            self.prepare_input(layer, bufs, n)
            graph = self.graphs[(layer.name, n)]
            graph.run(handle, self.graph_input(layer, bufs, n), self.graph_output(layer, bufs, n), bufs.workspace)
            if layer.kind == "upconv":
                self.scatter_upconv(layer, bufs, n)

    def run_pool(self, layer: Layer, bufs: SlotBuffers, n: int) -> None:
        """2x2 max pool; a skip the concat needs is copied (requantized) into its slice in the same pass."""
        source = layer.sources[0]
        skip = None
        if source in self.skip_copied_by_pool:
            cat, offset = self.skip_copied_by_pool[source]
            skip = bufs.acts[cat][:n, ..., offset:offset + self.plan.tensor(source).channels]
        self.glue.pool_and_copy(bufs.acts[source][:n], bufs.acts[layer.output][:n], skip,
                                self.requantize.get(source))

    def scatter_upconv(self, layer: Layer, bufs: SlotBuffers, n: int) -> None:
        """(n, h, w, [a, b, C]) GEMM output -> pixel (2i + a, 2j + b) of the (n, 2h, 2w, C) output view."""
        self.glue.scatter_upconv(bufs.gemm[layer.output][:n], bufs.acts[layer.output][:n])

    def run_concat(self, layer: Layer, bufs: SlotBuffers, n: int) -> None:
        """Fill the concat buffer's channel slices not written yet (upconvs and pools wrote theirs)."""
        out = bufs.acts[layer.output][:n]
        offset = 0
        for source in layer.sources:
            channels = self.plan.tensor(source).channels
            if source not in self.upconv_target and source not in self.skip_copied_by_pool:
                copy_requantized(bufs.acts[source][:n], out[..., offset:offset + channels], self.requantize.get(source))
            offset += channels

    def forward(self, bufs: SlotBuffers, n: int, handle: Any) -> torch.Tensor:
        """Enqueue the whole pass for bufs.pixels[:n] (n a built batch size); returns bufs.masks[:n]."""
        self.quantize_input(bufs, n)
        for layer in self.plan.layers:
            self.run_layer(layer, bufs, n, handle)
        return self.write_masks(bufs, n)

    def quantize_input(self, bufs: SlotBuffers, n: int) -> None:
        """Pixels -> the INT8 input tensor, through the 256-entry table."""
        x = bufs.acts[self.plan.input_tensor][:n]
        x.view(-1).copy_(self.table[bufs.pixels[:n].reshape(-1).long()])

    def write_masks(self, bufs: SlotBuffers, n: int) -> torch.Tensor:
        """The head's INT8 logits -> uint8 class per pixel in bufs.masks[:n] (returned)."""
        classes = self.plan.spec.classes
        logits = bufs.acts[self.plan.logits][:n, ..., :classes]
        if classes == 2:  # argmax of two: class 1 where it is strictly larger (a tie is class 0, as argmax)
            bufs.masks[:n].copy_(torch.gt(logits[..., 1], logits[..., 0]))
        else:
            bufs.masks[:n].copy_(torch.argmax(logits, dim=-1))
        return bufs.masks[:n]


def make_handle(cudnn: Any, stream: torch.cuda.Stream) -> Any:
    """A cuDNN handle whose work goes on `stream`."""
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=stream.cuda_stream)
    return handle


def rebuild_hint(path: Path | str, built: dict[str, str]) -> str:
    """How to rebuild a `.cudnn` file on this machine."""
    source = built.get("source", "MODEL_int8.onnx")
    return f"Rebuild it here: `engines build {source} --target cuda -o {Path(path).name}`."


class CudnnInt8Engine(SlotEngine):
    """A `.cudnn` INT8 U-Net on one CUDA device. `submit(uint8 (N, H, W))` -> InFlight of uint8 masks.

    Loading checks the GPU and cuDNN major version recorded in the file, uploads the weights, rebuilds
    every recorded cuDNN plan and captures one CUDA graph per slot and batch size. load_timings:
    seconds spent reading the file ("read_s"), building plans ("plans_s") and capturing ("capture_s").
    glue: the steps between the graphs ("auto", "torch" or "triton"; engines.int8_glue.select_glue);
    glue_name says which runs. slots: batches in flight (engines.cuda_slots; 2 by default), each with its own
    buffers and CUDA graphs.
    """

    def __init__(self, path: Path | str, device: str = "cuda", glue: str = "auto", slots: int = DEFAULT_SLOTS) -> None:
        self.path = Path(path)
        if not device.startswith("cuda"):
            raise EngineError(f"{self.path}: a cuDNN INT8 engine runs on CUDA only, not on {device!r}; on CPU run "
                              "the INT8 ONNX it was built from with ONNX Runtime")
        self.device = cuda_device(device, str(self.path))
        t0 = time.perf_counter()
        cudnn = import_cudnn()
        plan, built = load_plan(self.path)
        check_compatible(self.path, built, current_setup(str(self.device)), rebuild_hint(self.path, built))
        self.plan = plan
        self.spec = plan.spec
        self.batch_sizes = plan.batch_sizes
        self.name = f"cudnn-int8:{self.device} {self.path.name}"
        self.glue_name = ""
        t1 = time.perf_counter()
        with torch.cuda.device(self.device):
            self._runner = PlanRunner(plan, self.device, cudnn, glue)
            self.glue_name = self._runner.glue.name
            self._slots = CudaSlots(self.device, self.spec.max_batch, self.spec.height, self.spec.width, self.name,
                                    count=slots)
            self.slots = slots
            self._cudnn = cudnn
            self._handle = make_handle(cudnn, torch.cuda.current_stream(self.device))
            self._bufs = [self._runner.allocate(self.spec.max_batch) for _ in self._slots]
            self._runner.build_all(self._handle, self._bufs[0])
            ws = self._runner.workspace_size()
            for bufs in self._bufs:
                bufs.workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=self.device)
            t2 = time.perf_counter()
            self._graphs = [self._capture(slot) for slot in self._slots]
        self.load_timings = {"read_s": t1 - t0, "plans_s": t2 - t1, "capture_s": time.perf_counter() - t2}

    def profile_steps(self, repeats: int = 20) -> list[dict[str, Any]]:
        """GPU time of each step of one pass at the largest batch, run eagerly: a list of
        {"step", "kind", "precision", "ms"} in execution order (ms per run, the mean of `repeats` runs
        between two CUDA events). A diagnostic of where a pass's time goes; workers never call it."""
        bufs, handle, n = self._bufs[0], self._handle, max(self.batch_sizes)
        stream = torch.cuda.current_stream(self.device)
        self._cudnn.set_stream(handle=handle, stream=stream.cuda_stream)
        steps: list[tuple[str, str, str, Callable[[], Any]]] = [
            ("input", "input", "", functools.partial(self._runner.quantize_input, bufs, n))]
        for layer in self.plan.layers:
            precision = layer.precision if layer.kind in ("conv", "upconv") else ""
            steps.append((layer.name, layer.kind, precision,
                          functools.partial(self._runner.run_layer, layer, bufs, n, handle)))
        steps.append(("masks", "masks", "", functools.partial(self._runner.write_masks, bufs, n)))
        rows = []
        with torch.cuda.device(self.device):
            for name, kind, precision, step in steps:
                step()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for _ in range(repeats):
                    step()
                end.record(stream)
                end.synchronize()
                rows.append({"step": name, "kind": kind, "precision": precision,
                             "ms": start.elapsed_time(end) / repeats})
        return rows

    def _capture(self, slot: CudaSlot) -> dict[int, torch.cuda.CUDAGraph]:
        """One CUDA graph of the whole forward pass per batch size, on this slot's stream and buffers."""
        bufs, handle = self._bufs[slot.index], self._handle
        self._cudnn.set_stream(handle=handle, stream=slot.stream.cuda_stream)  # captured work goes on the slot
        graphs = {}
        with torch.cuda.stream(slot.stream):
            for batch in self.batch_sizes:  # warm up: lazy cuDNN/torch initialisation stays out of the capture
                self._runner.forward(bufs, batch, handle)
        torch.cuda.synchronize(self.device)
        for batch in self.batch_sizes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=slot.stream):
                self._runner.forward(bufs, batch, handle)
            graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        return graphs

    def _compute(self, x: torch.Tensor, slot: CudaSlot) -> torch.Tensor:
        n = x.shape[0]
        batch = next(b for b in self.batch_sizes if b >= n)
        bufs = self._bufs[slot.index]
        bufs.pixels[:n].copy_(x)  # rows n..batch keep stale pixels: their masks are dropped
        self._graphs[slot.index][batch].replay()
        return bufs.masks[:n]

    def _release(self) -> None:
        self._slots.close()
        self._graphs = []
        self._bufs = []
        self._handle = None
