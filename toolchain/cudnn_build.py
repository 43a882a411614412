"""Build a cuDNN INT8 engine (`.cudnn`) from the INT8 Q/DQ ONNX, on the GPU that will run it.

`engines build unet_int8.onnx --target cuda -o unet_int8.cudnn`:

1. Read the Q/DQ ONNX into an Int8Plan (engines/int8_plan.py): the same INT8 weights and scales
   that TensorRT and ONNX Runtime run; anything that is not the U-Net's graph is refused.
2. For each conv, at the largest batch, build the INT8 and the FP16 cuDNN graph, time every plan
   cuDNN's heuristics offer (modes A and B), and keep the faster precision, as TensorRT chooses
   per layer. The FP16 time includes widening the INT8 input to FP16 (or the channel padding an
   INT8 first conv needs). Up-convolutions run in FP16 (their weights are scaled per input channel).
3. For every other batch size, time the chosen precision's plans and keep the fastest.
4. Write the file: layers, chosen precision and both timings per layer, the plan (engine id and
   knobs) per layer and batch size, and what built it (GPU, compute capability, cuDNN).
5. Load it as a worker would and compare its masks with ONNX Runtime's on the same INT8 ONNX.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.base import EngineError
from engines.cuda_slots import cuda_device
from engines.cudnn_int8 import (
    ConvGraph,
    PlanRunner,
    SlotBuffers,
    import_cudnn,
    layer_weights,
    make_handle,
    setup_record,
)
from engines.int8_plan import PRECISIONS, Int8Plan, Layer, plan_from_onnx, save_plan

#: workspace a plan may use, bytes
WORKSPACE_LIMIT = 256 << 20
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


def event_timer(device: torch.device, warmup: int = 3, iters: int = 10) -> Callable[[Callable[[], None]], float]:
    """A function that runs `fn` warmup + iters times on the current stream and returns ms per iteration."""

    def timer(fn: Callable[[], None]) -> float:
        for _ in range(warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters

    return timer


def layer_buffers(runner: PlanRunner, layer: Layer, batch: int) -> SlotBuffers:
    """Just the buffers one layer reads and writes, at `batch` images, for timing it alone."""
    source = layer.sources[0]
    x = torch.randint(-128, 128, runner.tensor_shape(source, batch), dtype=torch.int8, device=runner.device)
    out, widened = runner.layer_scratch(layer, batch)
    acts: dict[str, torch.Tensor] = {source: x}
    gemm: dict[str, torch.Tensor] = {}
    (gemm if layer.kind == "upconv" else acts)[layer.output] = out
    wide = {} if widened is None else {layer.name: widened}
    empty = torch.empty(0, device=runner.device)
    return SlotBuffers(empty, empty, acts, wide, gemm)


def time_layer(runner: PlanRunner, layer: Layer, batch: int, handle: Any,
               timer: Callable[[Callable[[], None]], float]) -> tuple[float, dict[str, Any]]:
    """(ms, recipe): the fastest plan of `layer` at its current precision, input preparation included."""
    bufs = layer_buffers(runner, layer, batch)
    graph: ConvGraph = runner.build_graph(layer, batch, handle, bufs, recipe=None)
    x, y = runner.graph_input(layer, bufs, batch), runner.graph_output(layer, bufs, batch)
    ms, recipe = graph.autotune(handle, x, y, WORKSPACE_LIMIT, timer)
    if bufs.wide:
        ms += timer(lambda: runner.prepare_input(layer, bufs, batch))
    return ms, recipe


def choose_precision(timings_ms: dict[str, float]) -> str:
    """The precision with the smallest time; INT8 on a tie (it is what the file is for)."""
    return min(PRECISIONS, key=lambda p: (timings_ms.get(p, float("inf")), p != "int8"))


def tune_layer(runner: PlanRunner, layer: Layer, handle: Any, timer, batch_sizes: tuple[int, ...]) -> None:
    """Choose `layer`'s precision at the largest batch, then its plan at every batch size (in place)."""
    largest = max(batch_sizes)
    recipes: dict[str, dict[str, Any]] = {}
    candidates = PRECISIONS if layer.kind == "conv" else ("fp16",)
    for precision in candidates:
        layer.precision = precision
        runner.weights[layer.name] = layer_weights(runner.plan, layer, precision, runner.device)
        try:
            ms, recipes[precision] = time_layer(runner, layer, largest, handle, timer)
        except Exception as exc:  # cuDNN has no plan for this precision and shape: the other one stays
            layer.timings_ms[precision + "_error"] = str(exc).splitlines()[0][:200]  # type: ignore[assignment]
            continue
        layer.timings_ms[precision] = round(ms, 4)
    if not recipes:
        raise EngineError(f"layer {layer.name!r}: cuDNN has no plan in any precision ({layer.timings_ms})")
    layer.precision = choose_precision({p: layer.timings_ms[p] for p in recipes})
    runner.weights[layer.name] = layer_weights(runner.plan, layer, layer.precision, runner.device)
    layer.plans = {str(largest): recipes[layer.precision]}
    for batch in batch_sizes:
        if batch != largest:
            layer.plans[str(batch)] = time_layer(runner, layer, batch, handle, timer)[1]


def tune_plan(plan: Int8Plan, device: torch.device, batch_sizes: tuple[int, ...],
              progress: Callable[[str], None] = print) -> None:
    """Choose every conv/upconv layer's precision and plans on `device` (in place)."""
    cudnn = import_cudnn()
    with torch.cuda.device(device):
        runner = PlanRunner(plan, device, cudnn)
        handle = make_handle(cudnn, torch.cuda.current_stream(device))
        timer = event_timer(device)
        layers = [layer for layer in plan.layers if layer.kind in ("conv", "upconv")]
        for index, layer in enumerate(layers, 1):
            tune_layer(runner, layer, handle, timer, batch_sizes)
            times = ", ".join(f"{p} {layer.timings_ms[p]:.3f} ms" for p in PRECISIONS if p in layer.timings_ms)
            progress(f"[{index}/{len(layers)}] {layer.name}: {layer.precision} ({times})")


def build_cudnn_int8(source: Path | str, output: Path | str, device: str = "cuda",
                     batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                     progress: Callable[[str], None] = print) -> Int8Plan:
    """Build `output` (.cudnn) from the INT8 Q/DQ ONNX `source` on `device`; returns the tuned plan."""
    source, output = Path(source), Path(output)
    if not batch_sizes or min(batch_sizes) < 1:
        raise EngineError(f"batch sizes must be positive, got {batch_sizes}")
    plan = plan_from_onnx(source)
    dev = cuda_device(device, str(output))
    sizes = tuple(sorted(set(batch_sizes)))
    plan.batch_sizes = sizes
    plan.spec = replace(plan.spec, min_batch=1, max_batch=max(sizes))
    t0 = time.perf_counter()
    tune_plan(plan, dev, sizes, progress)
    built = {**setup_record(str(dev)), "source": source.name, "build_s": f"{time.perf_counter() - t0:.1f}",
             "calibration": plan.spec.built_with.get("calibration", "")}
    plan.spec = replace(plan.spec, precision="int8", built_with={**plan.spec.built_with, **built})
    save_plan(plan, output, built)
    progress(f"wrote {output}; checking it against ONNX Runtime on the same INT8 ONNX")
    agreement = agreement_with_onnx(output, source, device)
    check = f"masks agree {agreement:.4%} with ONNX Runtime on the same INT8 ONNX (2 synthetic images)"
    plan.spec = replace(plan.spec, built_with={**plan.spec.built_with, "check": check})
    save_plan(plan, output, built)
    return plan


def agreement_with_onnx(engine_path: Path | str, onnx_path: Path | str, device: str, count: int = 2,
                        seed: int = 7) -> float:
    """Share of mask pixels where the built engine agrees with ONNX Runtime on the same INT8 ONNX."""
    from engines.base import infer
    from engines.cudnn_int8 import CudnnInt8Engine
    from engines.onnx_engine import OnnxEngine
    from toolchain.synth import generate

    with CudnnInt8Engine(engine_path, device=device) as engine, OnnxEngine(Path(onnx_path)) as reference:
        spec = engine.spec
        images = np.stack([image for image, _ in generate(count, size=spec.height, seed=seed)])
        if images.shape[1:] != (spec.height, spec.width):
            raise EngineError("synthetic images do not match the engine's input size")
        return float(np.mean(infer(engine, images) == infer(reference, images)))
