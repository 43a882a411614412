"""`engines build`: make one engine file from another; the output's name and the options say which.

    SOURCE        OUTPUT                OPTIONS                         WHAT
    unet.pt       unet.onnx             (--precision fp32)              FP32 ONNX export (toolchain.export)
    unet.pt       unet_fp16.onnx        --precision fp16                export, then FP16 ONNX
    unet.pt       unet_int8.onnx        --precision int8 --calib ...    export, then INT8 Q/DQ ONNX
    unet.onnx     unet_fp16.onnx        --precision fp16                FP16 ONNX (toolchain.fp16)
    unet.onnx     unet_int8.onnx        --precision int8 --calib DIR    INT8 Q/DQ ONNX (toolchain.int8)
    unet.onnx     unet_int8_nocal.onnx  --precision int8 --calib none   INT8 Q/DQ ONNX, data-free ranges
    any .onnx     unet.trt/.engine/.plan                                TensorRT plan (toolchain.tensorrt_build);
                                                                        its precision is the ONNX graph's
    unet.pt       unet_fp16.ptc         --compile (--precision fp16)    compiled torch engine (toolchain.compile)
    unet_int8.onnx unet_int8.cudnn      --target cuda                   cuDNN INT8 engine (toolchain.cudnn_build),
                                                                        from the INT8 Q/DQ ONNX, on its GPU

Anything else is an EngineError that lists these combinations.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from engines.base import EngineError, EngineSpec

PRECISIONS = ("fp32", "fp16", "int8")
PLAN_SUFFIXES = (".trt", ".engine", ".plan")
TORCH_SUFFIXES = (".pt", ".pth")

COMBINATIONS = (
    "X.pt -o Y.onnx [--precision fp32|fp16|int8]; "
    "X.onnx --precision fp16 -o Y.onnx; "
    "X.onnx --precision int8 --calib DIR|none -o Y.onnx; "
    "X.onnx -o Y.trt|.engine|.plan (precision from the ONNX graph); "
    "X.pt --compile [--precision fp16] -o Y.ptc; "
    "X_int8.onnx --target cuda -o Y.cudnn"
)
CUDNN_SUFFIX = ".cudnn"


def _unsupported(source: Path, output: Path, why: str) -> EngineError:
    return EngineError(f"{source} -> {output}: {why}; possible builds: {COMBINATIONS}")


def build(
    source: Path,
    output: Path,
    precision: str | None = None,
    calib: str | None = None,
    calib_method: str = "minmax",
    calib_count: int = 64,
    compile: bool = False,
    device: str = "cuda",
    max_batch: int = 8,
    target: str = "tensorrt",
) -> Path:
    """Build `output` from `source` (see the module table) and return `output`.

    precision: "fp32", "fp16", "int8" or None (the source's own / fp32). calib: a folder of images
    or "none" (INT8 only). calib_method: "minmax" | "entropy" | "percentile". calib_count: images
    used for calibration. compile: build a compiled torch engine (.ptc). device: CUDA device for
    TensorRT plans and compiled engines. max_batch: largest batch of a TensorRT plan or ONNX export.
    target: INT8 Q/DQ layout, "tensorrt" (portable) or "cpu" (ONNX Runtime CPU only).
    Writes the output's metadata beside it (or inside it). Raises EngineError naming the file.
    """
    source, output = Path(source), Path(output)
    src_suffix, out_suffix = source.suffix.lower(), output.suffix.lower()
    if precision is not None and precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if not source.is_file():
        raise EngineError(f"{source}: source file not found")
    if output.resolve() == source.resolve():
        raise EngineError(f"{output}: output would overwrite its source; choose another name")
    if max_batch < 1:
        raise EngineError(f"max batch must be >= 1, got {max_batch}")
    if calib is not None and precision != "int8":
        raise _unsupported(source, output, "--calib applies to --precision int8 only")
    if out_suffix == CUDNN_SUFFIX or target == "cuda":
        return _build_cudnn(source, output, precision, target, device, max_batch)
    if precision == "int8" and not compile and out_suffix == ".onnx":
        from toolchain.int8 import check_int8_options

        check_int8_options(calib_method, target)
        _check_calib(source, calib, calib_count)

    if compile:
        if src_suffix not in TORCH_SUFFIXES:
            raise _unsupported(source, output, "--compile builds from a torch checkpoint (.pt)")
        if precision not in (None, "fp16"):
            raise _unsupported(source, output, f"compiled engines are fp16, not {precision}")
        from toolchain.compile import build_compiled

        return build_compiled(source, output, device=device, precision="fp16")

    if out_suffix in PLAN_SUFFIXES:
        return _build_plan(source, output, precision, device, max_batch)

    if out_suffix != ".onnx":
        raise _unsupported(source, output, f"unknown output type {out_suffix or '(no extension)'!r}")

    if src_suffix in TORCH_SUFFIXES:
        return _from_checkpoint(source, output, precision or "fp32", calib, calib_method, calib_count,
                                max_batch, target)
    if src_suffix == ".onnx":
        spec = EngineSpec.read_beside(source)
        want = precision or spec.precision
        if want == spec.precision:
            raise _unsupported(source, output,
                               f"the source is already {spec.precision}; choose --precision fp16 or int8")
        return _from_onnx(source, output, want, calib, calib_method, calib_count, target)
    raise _unsupported(source, output, f"unknown source type {src_suffix or '(no extension)'!r}")


def _check_calib(source: Path, calib: str | None, count: int) -> None:
    """EngineError unless `calib` is "none" or a folder holding images (checked before any slow work)."""
    if calib is None:
        raise EngineError(
            f"{source}: INT8 needs calibration images: --calib DIR (a folder of images like the ones to "
            "segment) or --calib none (data-free ranges, the uncalibrated baseline)"
        )
    if calib.lower() != "none":
        from toolchain.int8 import calibration_files

        calibration_files(Path(calib), count)


def _from_onnx(source: Path, output: Path, precision: str, calib: str | None, method: str, count: int,
               target: str) -> Path:
    if precision == "fp16":
        from toolchain.fp16 import convert_fp16

        return convert_fp16(source, output).path
    if precision == "int8":
        _check_calib(source, calib, count)
        folder = None if calib is None or calib.lower() == "none" else Path(calib)
        from toolchain.int8 import quantize_int8

        return quantize_int8(source, output, folder, method=method, count=count, target=target).path
    raise _unsupported(source, output, f"an FP32 ONNX file comes from a checkpoint (.pt), not from {source.suffix}")


def _from_checkpoint(source: Path, output: Path, precision: str, calib: str | None, method: str, count: int,
                     max_batch: int, target: str) -> Path:
    from engines.checkpoint import load_checkpoint
    from toolchain.export import export_onnx

    spec = load_checkpoint(source).spec
    if precision == "fp32":
        return export_onnx(source, output, spec.height, spec.width, max_batch=max_batch).path
    with tempfile.TemporaryDirectory(prefix="engines-build-") as tmp:
        fp32 = Path(tmp) / f"{source.stem}.onnx"  # the metadata's "source" then names the checkpoint's stem
        export_onnx(source, fp32, spec.height, spec.width, max_batch=max_batch)
        return _from_onnx(fp32, output, precision, calib, method, count, target)


def cudnn_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a cuDNN INT8 engine gets plans for: powers of two below max_batch, and max_batch."""
    return tuple(sorted({b for b in (1, 2, 4, 8, 16, 32) if b < max_batch} | {max_batch}))


def _build_cudnn(source: Path, output: Path, precision: str | None, target: str, device: str,
                 max_batch: int) -> Path:
    if output.suffix.lower() != CUDNN_SUFFIX or target not in ("cuda", "tensorrt"):
        raise _unsupported(source, output, "--target cuda writes a cuDNN INT8 engine, named *.cudnn")
    if source.suffix.lower() != ".onnx" or EngineSpec.read_beside(source).precision != "int8":
        raise _unsupported(source, output, "a cuDNN INT8 engine is built from the INT8 Q/DQ ONNX "
                           "(engines build X.onnx --precision int8 --calib DIR -o X_int8.onnx)")
    if precision not in (None, "int8"):
        raise _unsupported(source, output, f"a cuDNN engine is int8, not {precision}")
    from toolchain.cudnn_build import build_cudnn_int8

    build_cudnn_int8(source, output, device=device, batch_sizes=cudnn_batch_sizes(max_batch))
    return output


def _build_plan(source: Path, output: Path, precision: str | None, device: str, max_batch: int) -> Path:
    if source.suffix.lower() != ".onnx":
        raise _unsupported(source, output, "a TensorRT plan is built from an ONNX file (export the checkpoint first)")
    spec = EngineSpec.read_beside(source)
    if precision is not None and precision != spec.precision:
        raise EngineError(
            f"{source}: is an {spec.precision} ONNX graph and TensorRT takes precision from the graph; build "
            f"the {precision} ONNX first (engines build {source.name} --precision {precision} -o X.onnx), then the plan"
        )
    if max_batch > spec.max_batch:
        raise EngineError(f"{source}: accepts batches up to {spec.max_batch}, a plan for {max_batch} was requested")
    if spec.precision == "int8":
        from toolchain.int8 import tensorrt_incompatibilities

        problems = tensorrt_incompatibilities(source)
        if problems:
            raise EngineError(
                f"{source}: TensorRT refuses this Q/DQ graph ({'; '.join(problems)}): it was built for ONNX Runtime "
                "CPU (--target cpu); rebuild it with --target tensorrt"
            )
    from toolchain.tensorrt_build import build_plan

    return build_plan(source, output, min_batch=1, opt_batch=max_batch, max_batch=max_batch, device=device)
