"""`engines` command line: make synthetic data, train, export, build, inspect, score and time engines.

Errors about files or settings print one line to stderr and exit with status 2 (no traceback).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from common.cli import Typer, exit_2_on
from engines.base import EngineError

app = Typer(
    help=(
        "U-Net engines: synthetic data, training, ONNX export, FP16/INT8/TensorRT builds, engine info, Dice and "
        "throughput."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


#: errors about files or settings: one line on stderr and exit status 2 (common.cli)
_errors_exit_2 = exit_2_on(EngineError, ValueError, OSError)


def _command_line() -> str:
    return shlex.join(["engines", *sys.argv[1:]])


@app.command()
@_errors_exit_2
def synth(
    out: Annotated[Path, typer.Argument(help="Output directory; gets images/ and truth/ (the exact masks), PNG.")],
    n: Annotated[int, typer.Option("--n", help="Number of image/mask pairs.")] = 100,
    size: Annotated[str, typer.Option(help=(
        "Image size in pixels: a side (512) or WIDTHxHEIGHT (2048x1536); any size from 16 px up."
    ))] = "512",
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same images.")] = 0,
    pages: Annotated[int, typer.Option(min=1, help=(
        "Pages per file: above 1, write --n multi-page TIFF stacks (stack_00000.tif) of distinct pages instead."
    ))] = 1,
) -> None:
    """Write synthetic microscopy-like images and exact masks (mask PNGs and TIFF pages are 0/255; threshold 128)."""
    from toolchain.synth import IMAGES_DIR, TRUTH_DIR, parse_size, write_dataset

    write_dataset(out, n, parse_size(size), seed, pages=pages)
    what = f"{n} stacks of {pages} pages" if pages > 1 else f"{n} images"
    typer.echo(f"wrote {what} to {out / IMAGES_DIR} and their exact masks to {out / TRUTH_DIR}")


@app.command()
@_errors_exit_2
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (.pt).")] = Path("unet.pt"),
    width: Annotated[int, typer.Option(help="U-Net base width (16 for CPU demos, 64 as in the study).")] = 16,
    size: Annotated[int, typer.Option(help="Synthetic image side in pixels; also the spec's input size.")] = 512,
    crop: Annotated[int, typer.Option(help="Training crop side in pixels (multiple of 16).")] = 128,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    batch: Annotated[int, typer.Option(help="Crops per step.")] = 12,
    lr: Annotated[float, typer.Option(help="Peak Adam learning rate (warm-up, then cosine decay).")] = 3e-3,
    dice_weight: Annotated[float, typer.Option(help="Weight of the soft-Dice term added to cross-entropy.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed for data, crops and weights.")] = 0,
    pool: Annotated[int, typer.Option(help="Synthetic images kept in memory (one is replaced per step).")] = 48,
    data_dir: Annotated[
        Path | None, typer.Option(help="Train on an `engines synth` directory instead of fresh images.")
    ] = None,
    eval_n: Annotated[int, typer.Option(help="Held-out images scored (Dice) at the end.")] = 32,
    eval_seed: Annotated[int | None, typer.Option(help="Held-out seed (default: seed + 1000003).")] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch recorded in the checkpoint's spec.")] = 8,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
) -> None:
    """Train a U-Net on synthetic images; stores held-out Dice and this command in the checkpoint."""
    from toolchain.train import TrainConfig
    from toolchain.train import train as run_training

    cfg = TrainConfig(
        out=out, width=width, size=size, crop=crop, steps=steps, batch=batch, lr=lr, dice_weight=dice_weight,
        seed=seed, pool=pool, data_dir=data_dir, eval_n=eval_n, eval_seed=eval_seed, max_batch=max_batch,
        threads=threads, command=_command_line(),
    )
    result = run_training(cfg)
    typer.echo(
        f"wrote {result.checkpoint}: held-out Dice {result.heldout_dice:.4f} on {eval_n} images, "
        f"wall {result.wall_s:.0f} s"
    )


@app.command()
@_errors_exit_2
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (.pt) written by `engines train`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="ONNX file to write; metadata goes beside it.")],
    size: Annotated[int, typer.Option(help="Input side in pixels (multiple of 16).")] = 512,
    max_batch: Annotated[int, typer.Option(help="Largest batch; the graph accepts 1..max-batch.")] = 8,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
) -> None:
    """Export a checkpoint to FP32 ONNX (dynamic batch), checked against torch."""
    from toolchain.export import export_onnx

    result = export_onnx(checkpoint, output, size, size, max_batch=max_batch, opset=opset)
    typer.echo(f"wrote {result.path} and {result.metadata}: max |onnx - torch| = {result.max_abs_diff:.2e}")


@app.command()
@_errors_exit_2
def info(file: Annotated[Path, typer.Argument(help="Engine file (.onnx with its .json, or .pt).")]) -> None:
    """Print an engine file's spec and what built it."""
    from engines.loader import read_spec

    spec = read_spec(file)
    typer.echo(f"{file}")
    typer.echo(f"  input      {spec.input_name}: N x {spec.channels} x {spec.height} x {spec.width}, "
               f"N in {spec.min_batch}..{spec.max_batch}")
    typer.echo(f"  output     {spec.classes} classes (uint8 masks)")
    typer.echo(f"  precision  {spec.precision}")
    n = spec.normalization
    typer.echo(f"  normalize  (pixel * {n.scale:.6g} - {n.mean:g}) / {n.std:g}")
    typer.echo("  built with " + ", ".join(f"{k}={v}" for k, v in sorted(spec.built_with.items())))
    if file.suffix.lower() == ".cudnn":
        _print_cudnn_layers(file)
    if file.suffix.lower() in (".pt", ".pth"):
        from engines.checkpoint import load_checkpoint

        training = load_checkpoint(file).training
        if training:
            typer.echo(f"  trained    {training.get('command', '?')}")
            typer.echo(f"  held-out   Dice {training.get('heldout_dice', float('nan')):.4f} "
                       f"on {training.get('heldout_n', '?')} images (seed {training.get('eval_seed', '?')})")


def _print_cudnn_layers(file: Path) -> None:
    """A cuDNN INT8 engine's layers: precision, build timings (ms at the largest batch), plan per batch size."""
    from engines.int8_plan import read_plan_document

    doc = read_plan_document(file)
    typer.echo(f"  batches    {', '.join(str(b) for b in doc['batch_sizes'])} (smaller batches run padded)")
    typer.echo("  layers     name: kind, precision (build timings), plan at the largest batch")
    largest = str(max(doc["batch_sizes"]))
    for layer in doc["layers"]:
        if layer["kind"] in ("pool", "concat"):
            continue
        times = ", ".join(f"{k} {v:.3f} ms" for k, v in layer.get("timings_ms", {}).items() if isinstance(v, float))
        plan = layer.get("plans", {}).get(largest, {})
        typer.echo(f"    {layer['name']}: {layer['kind']} {layer.get('kernel', '')}x{layer.get('kernel', '')}, "
                   f"{layer['precision']}" + (f" ({times})" if times else "")
                   + (f", plan engine {plan.get('engine')} {plan.get('name', '')}".rstrip() if plan else ""))


@app.command()
@_errors_exit_2
def evaluate(
    file: Annotated[Path, typer.Argument(help="Engine file (.onnx or .pt).")],
    n: Annotated[int, typer.Option("--n", help="Synthetic images to score.")] = 32,
    seed: Annotated[int, typer.Option(help="Synthetic seed (pick one the model was not trained on).")] = 1_000_003,
    batch: Annotated[int, typer.Option(help="Batch size (at most the engine's max batch).")] = 8,
    device: Annotated[str, typer.Option(help="cpu or cuda[:i].")] = "cpu",
    precision: Annotated[
        str | None, typer.Option(help="Torch checkpoints: fp32 or fp16 (CUDA); default: the file's own.")
    ] = None,
) -> None:
    """Mean Dice of an engine on synthetic images of its input size."""
    import numpy as np

    from common.metrics import dice
    from engines.base import infer
    from engines.loader import load_engine
    from toolchain.synth import generate

    engine = load_engine(file, device=device, precision=precision)
    try:
        pairs = list(generate(n, engine.spec.height, seed))
        step = min(batch, engine.spec.max_batch)
        scores = []
        for i in range(0, n, step):
            chunk = pairs[i : i + step]
            masks = infer(engine, np.stack([p[0] for p in chunk]))
            scores += [dice(m, p[1]) for m, p in zip(masks, chunk, strict=True)]
    finally:
        engine.close()
    typer.echo(f"{engine.name}: mean Dice {np.mean(scores):.4f} on {n} images (seed {seed})")


@app.command()
@_errors_exit_2
def build(
    source: Annotated[Path, typer.Argument(help="Source: an FP32 .onnx (with its .json) or a .pt checkpoint.")],
    output: Annotated[
        Path, typer.Option("-o", "--output",
                           help="File to write: .onnx, .trt/.engine/.plan (TensorRT), .ptc or .cudnn (cuDNN INT8).")
    ],
    precision: Annotated[
        str | None, typer.Option(help="fp32, fp16 or int8 (default: the source's own; fp32 for a checkpoint).")
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            help="INT8 only: a folder of real images (decoded as the producer does, at the engine's size) "
            "to calibrate on, or 'none' for the study's uncalibrated row: ranges computed from uniform "
            "random noise images instead of real ones (data-free, so the ranges are wrong for real data)."
        ),
    ] = None,
    calib_method: Annotated[
        str, typer.Option(help=(
            "INT8 range method: minmax (default; the study found entropy wrong), entropy, percentile."
        ))
    ] = "minmax",
    calib_count: Annotated[int, typer.Option(help="INT8: calibration images used (spread over the folder).")] = 64,
    target: Annotated[
        str,
        typer.Option(
            help="INT8 Q/DQ layout: tensorrt (default: int8 symmetric, zero point 0, float bias; runs on TensorRT "
            "10/11 and ONNX Runtime) or cpu (uint8 activations, int32 bias: ONNX Runtime's fast CPU form, "
            "refused by TensorRT); or cuda, with an INT8 .onnx source and a .cudnn output: a cuDNN INT8 "
            "engine built and timed on this machine's GPU (needs the cuda-int8 extra)."
        ),
    ] = "tensorrt",
    compile: Annotated[
        bool, typer.Option("--compile", help="Build a compiled torch engine (.ptc, FP16, CUDA) from a checkpoint.")
    ] = False,
    device: Annotated[str, typer.Option(help="CUDA device for TensorRT plans, compiled and cuDNN engines.")] = "cuda",
    max_batch: Annotated[int, typer.Option(help="Largest batch of a TensorRT plan, cuDNN engine or ONNX export.")] = 8,
) -> None:
    """Build an engine file: FP16/INT8 ONNX, a TensorRT plan, a compiled torch engine, or an FP32 export.

    \b
      engines build unet.onnx --precision fp16 -o unet_fp16.onnx
      engines build unet.onnx --precision int8 --calib ./images -o unet_int8.onnx
      engines build unet.onnx --precision int8 --calib none -o unet_int8_nocal.onnx
      engines build unet_int8.onnx -o unet_int8.trt
      engines build unet.pt --precision fp16 --compile -o unet_fp16.ptc
      engines build unet_int8.onnx --target cuda -o unet_int8.cudnn
      engines build unet.pt -o unet.onnx
    """
    from engines.loader import read_spec
    from toolchain.build import build as run_build

    written = run_build(
        source, output, precision=precision, calib=calib, calib_method=calib_method, calib_count=calib_count,
        compile=compile, device=device, max_batch=max_batch, target=target,
    )
    spec = read_spec(written)
    made = spec.built_with
    line = f"wrote {written}: {spec.precision}, batch {spec.min_batch}..{spec.max_batch}, {spec.height}x{spec.width}"
    if spec.precision == "int8" and "calibration" in made:
        line += (f"; calibration {made['calibration']} on {made.get('calibration_images', '?')} images "
                 f"({made.get('calibration_source', '?')}), target {made.get('target', '?')}")
        if made.get("calibration_skipped", "0") != "0":
            line += f", {made['calibration_skipped']} unreadable images skipped"
    if "check" in made:
        line += f"; check: {made['check']}"
    typer.echo(line)


@app.command()
@_errors_exit_2
def bench(
    files: Annotated[list[Path], typer.Argument(help="Engine files (.onnx, .pt, .trt, .ptc, .cudnn, ...).")],
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated, e.g. 1,4,8.")] = "8",
    samples: Annotated[
        int | None, typer.Option(help="Images per engine and batch size (default: 1000 on cuda, 32 on cpu).")
    ] = None,
    warmup: Annotated[int | None, typer.Option(help="Untimed batches first (default: 20 on cuda, 2 on cpu).")] = None,
    rounds: Annotated[
        int, typer.Option(help="Measurements per row, interleaved across engines; the median is shown.")
    ] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda[:i].")] = "cpu",
    precision: Annotated[
        str | None, typer.Option(help="Torch checkpoints: fp32 or fp16 (CUDA); default: the file's own.")
    ] = None,
    slots: Annotated[int | None, typer.Option(min=1, show_default=False, help=(
        "Batches in flight on a CUDA engine (default 2), as `worker run --engine-slots`."
    ))] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON (date, machine, versions, command).")
    ] = None,
) -> None:
    """Engine-only throughput in the study's table shape: variant, batch size, samples, runtime (s), FPS.

    Keeps each engine's `slots` batches in flight, as the worker does; no decoding and no Redis.
    """
    import json

    from engines.loader import load_engine
    from toolchain.bench import DEFAULT_SAMPLES, DEFAULT_WARMUP, bench_engines, format_table, parse_batches, report

    batches = parse_batches(batch)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    n = samples if samples is not None else DEFAULT_SAMPLES[kind]
    loaded = []
    try:
        for file in files:
            loaded.append((file, load_engine(file, device=device, precision=precision, slots=slots)))
        for file, engine in loaded:
            too_big = [b for b in batches if b > engine.spec.max_batch]
            if too_big:
                typer.echo(f"note: {file}: batch {too_big} above its max batch {engine.spec.max_batch}, skipped",
                           err=True)
        rows = bench_engines(
            [(engine.name, engine) for _, engine in loaded], batches, n,
            warmup=warmup if warmup is not None else DEFAULT_WARMUP[kind], rounds=rounds,
            file_names=[str(file) for file, _ in loaded],
        )
    finally:
        for _, engine in loaded:
            engine.close()
    typer.echo(format_table(rows))
    if json_out is not None:
        record = report(rows, _command_line(), device, benchmark="engines bench", rounds=rounds)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(record, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
