"""Build a TensorRT plan from an ONNX file (TensorRT 10.x and 11.x), with its metadata beside it.

The network is strongly typed: precision comes from the ONNX graph itself (an FP32 graph, an FP16
graph, or an INT8 graph with explicit Q/DQ nodes), never from builder flags. That is the only mode
TensorRT 11 has (it removed the FP16/INT8 flags and the calibrators); on 10.x the flag asks for it.
The one optimization profile covers batch min/opt/max at the ONNX input's fixed channels, height
and width. The metadata (`<plan>.json`) is the source ONNX's spec with the plan's batch range and
what built it: TensorRT version, GPU name and compute capability, which the loader checks.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from engines.base import EngineError, EngineSpec, metadata_path
from engines.tensorrt_engine import import_tensorrt, trt_logger
from engines.versions import built_with, gpu_identity


def onnx_input(onnx_path: Path) -> tuple[str, list[int]]:
    """(name, dims) of an ONNX model's single graph input; dynamic dims are -1."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise EngineError(f"{onnx_path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise EngineError(f"{onnx_path}: expected one graph input, found {[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def build_plan(
    onnx_path: Path,
    out_path: Path,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 8,
    device: str = "cuda",
    workspace_gib: float | None = None,
) -> Path:
    """Build a TensorRT plan from `onnx_path` (metadata `<onnx>.json` beside it) into `out_path`.

    min/opt/max_batch: the optimization profile's batch sizes (TensorRT tunes for opt_batch).
    device: the CUDA device to build on (the plan then runs on that GPU model only).
    workspace_gib: builder workspace limit (None: TensorRT's default, the device memory).
    Writes `<out>.json` with the EngineSpec (precision from the source ONNX's metadata). Raises
    EngineError when TensorRT is missing, the ONNX parser fails (its errors listed), or the build fails.
    """
    onnx_path, out = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: ONNX file not found")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    source = EngineSpec.read_beside(onnx_path)
    name, dims = onnx_input(onnx_path)
    if len(dims) != 4 or min(dims[1:]) < 1:
        raise EngineError(f"{onnx_path}: input {name!r} must be N x C x H x W with fixed C, H, W; got {dims}")
    if dims[0] > 0 and not min_batch == max_batch == dims[0]:
        raise EngineError(f"{onnx_path}: the graph's batch is fixed at {dims[0]}; use min = opt = max = {dims[0]}")
    channels, height, width = dims[1:]

    trt = import_tensorrt()
    logger = trt_logger(trt)
    identity = gpu_identity(device)
    import torch

    started = time.perf_counter()
    with torch.cuda.device(torch.device(device)):
        torch.cuda.init()
        builder = trt.Builder(logger)
        # strongly typed: required on 10.x for graph-carried precision, the default (flag ignored) on 11.x
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(
                f"{onnx_path}: TensorRT's ONNX parser failed with {len(errors)} error(s): " + " | ".join(errors[:10])
            )
        config = builder.create_builder_config()
        if workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        profile = builder.create_optimization_profile()
        profile.set_shape(
            name,
            (min_batch, channels, height, width),
            (opt_batch, channels, height, width),
            (max_batch, channels, height, width),
        )
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"{onnx_path}: TensorRT {trt.__version__} failed to build a plan ({logger.recent()})")
    build_s = time.perf_counter() - started

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        f.write(serialized)
    spec = replace(
        source,
        input_name=name,
        channels=channels,
        height=height,
        width=width,
        min_batch=min_batch,
        max_batch=max_batch,
        built_with=built_with(
            str(device),
            tensorrt=trt.__version__,
            **identity,
            cuda=str(torch.version.cuda),
            source=onnx_path.name,
            source_precision=source.precision,
            opt_batch=str(opt_batch),
            strongly_typed="true",
            build_s=f"{build_s:.1f}",
        ),
    )
    metadata_path(out).write_text(spec.to_json() + "\n")
    return out
