"""The seed study's two tables, reproduced on this hardware from one trained checkpoint.

    python benchmarks/study_tables.py --device cpu  --samples 16,64                     # CPU run
    python benchmarks/study_tables.py --device cuda --samples 1000,10000 --dice-n 100   # GPU run

Table 1 (speed): variant x batch size (1, 4, 8) x samples -> runtime (s), FPS, engine-only
(toolchain.bench: uint8 in, masks out, 2 batches in flight). Table 2 (quality): per variant, best FPS,
Dice against ground truth on held-out synthetic images, and Deviation = Dice - Dice of FP32 torch
(the study's "vs FP32" column). Variants that cannot run on the target are listed with the reason.
Every engine is built in a temporary folder by `toolchain.build` from --checkpoint; INT8 is calibrated
(MinMax) on synthetic images from another seed than the held-out set. Writes JSON and Markdown to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.metrics import dice  # noqa: E402
from engines import DEMO_CHECKPOINT  # noqa: E402
from engines.base import infer  # noqa: E402
from engines.loader import load_engine  # noqa: E402
from toolchain.bench import BenchRow, bench_engines, format_table, report  # noqa: E402
from toolchain.build import build  # noqa: E402
from toolchain.synth import generate, write_dataset  # noqa: E402

HELDOUT_SEED = 1000003  # the demo model's held-out seed (engines/demo/README.md)
CALIB_SEED = 4242
NO_INT8_GPU = "no INT8 runtime on the GPU machine: TensorRT absent, onnxruntime CPU-only"
NO_TENSORRT = ("TensorRT cannot be installed here or on the GPU machine (DESIGN.md); "
               "tests/integration/test_tensorrt.py runs where it can")


@dataclass(frozen=True)
class Variant:
    """One row of the study: how to build it from the checkpoint, and where it can run."""

    name: str
    build: dict | None  # toolchain.build arguments (output suffix + options), None = the checkpoint itself
    precision: str | None = None  # load_engine precision (torch checkpoints)
    devices: tuple[str, ...] = ("cpu", "cuda")
    reason: str = ""  # why it cannot run where it does not
    strict_fp32: bool = False  # CUDA: turn TF32 off while it runs


VARIANTS = (
    Variant("FP32 torch", None, "fp32", strict_fp32=True),
    Variant("TF32 torch", None, "fp32", ("cuda",), "TF32 is a CUDA tensor-core mode"),
    Variant("FP16 torch AMP", None, "amp", ("cuda",), "autocast FP16 convolutions need CUDA"),
    Variant("FP16 torch channels_last", None, "fp16", ("cuda",), "half-precision convolutions need CUDA"),
    Variant("FP16 compiled torch (.ptc)", {"suffix": ".ptc", "compile": True, "precision": "fp16"}, None, ("cuda",),
            "the compiled engine is built for and checked against one CUDA GPU"),
    Variant("FP32 ONNX Runtime", {"suffix": ".onnx", "precision": "fp32"}, None, ("cpu",),
            "onnxruntime on the GPU machine is the CPU build (no onnxruntime-gpu there)"),
    Variant("FP16 ONNX Runtime", {"suffix": "_fp16.onnx", "precision": "fp16"}, None, ("cpu",),
            "onnxruntime on the GPU machine is the CPU build (no onnxruntime-gpu there)"),
    Variant("FP16 ONNX+TensorRT", None, None, (), NO_TENSORRT),
    Variant("INT8 ONNX Runtime, MinMax calibration", {"suffix": "_int8.onnx", "precision": "int8", "calib": "CALIB",
            "target": "cpu"}, None, ("cpu",), NO_INT8_GPU),
    Variant("INT8 ONNX Runtime, MinMax, portable Q/DQ", {"suffix": "_int8_trt.onnx", "precision": "int8",
            "calib": "CALIB", "target": "tensorrt"}, None, ("cpu",),
            "no INT8 runtime on the GPU machine: TensorRT absent, onnxruntime CPU-only"),
    Variant("INT8 ONNX+TensorRT (MinMax calibration)", None, None, (), NO_TENSORRT),
    Variant("INT8 cuDNN (MinMax calibration)", {"suffix": "_int8.cudnn", "target": "cuda", "from": "_int8_trt.onnx"},
            None, ("cuda",), "cuDNN INT8 graphs run on a CUDA GPU"),
    Variant("INT8 cuDNN, no calibration", {"suffix": "_int8_nocal.cudnn", "target": "cuda",
            "from": "_int8_nocal_trt.onnx"}, None, ("cuda",), "cuDNN INT8 graphs run on a CUDA GPU"),
    Variant("INT8 ONNX Runtime, no calibration", {"suffix": "_int8_nocal.onnx", "precision": "int8", "calib": "none",
            "target": "cpu"}, None, ("cpu",), NO_INT8_GPU),
)


def build_variant(variant: Variant, checkpoint: Path, work: Path, calib_dir: Path, device: str) -> Path:
    """The engine file of `variant`, built into `work` (the checkpoint itself for eager torch rows)."""
    if variant.build is None:
        return checkpoint
    options = dict(variant.build)
    output = work / f"unet{options.pop('suffix')}"
    if options.get("calib") == "CALIB":
        options["calib"] = str(calib_dir)
    source = checkpoint
    if "from" in options:  # a cuDNN INT8 engine is built from the portable INT8 Q/DQ ONNX
        qdq = options.pop("from")
        calib = "none" if "nocal" in qdq else "CALIB"
        source = build_variant(Variant(qdq, {"suffix": qdq, "precision": "int8", "calib": calib, "target": "tensorrt"}),
                               checkpoint, work, calib_dir, device)
    elif output.suffix == ".onnx" and options.get("precision") != "fp32":
        source = work / "unet.onnx"
        if not source.exists():
            build(checkpoint, source, precision="fp32")
    if not output.exists():
        build(source, output, device=device if device.startswith("cuda") else "cuda", **options)
    return output


@contextlib.contextmanager
def tf32(enabled: bool, device: str):
    """Set torch's TF32 switches for CUDA convolutions and matmuls while a variant runs."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def heldout(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out synthetic images and their true masks, (n, size, size) uint8 each."""
    pairs = list(generate(n, size=size, seed=HELDOUT_SEED))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def mean_dice(engine, images: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-image Dice of the engine's masks against the truth, batches of 8."""
    scores = []
    for first in range(0, len(images), 8):
        masks = infer(engine, images[first:first + 8])
        scores += [dice(m, t) for m, t in zip(masks, truth[first:first + 8], strict=True)]
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", default="16,64", help="samples per measurement, comma-separated")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--dice-n", type=int, default=32, help="held-out images scored for Dice")
    parser.add_argument("--calib-n", type=int, default=64, help="synthetic images used for INT8 calibration")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only matching variants")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    target = "cuda" if args.device.startswith("cuda") else "cpu"
    samples = [int(s) for s in args.samples.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    wanted = [w for w in args.only.split(",") if w]

    speed: list[BenchRow] = []
    quality: list[dict] = []
    not_run: list[dict] = []
    build_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib_dir = write_dataset(work / "calib", args.calib_n, size=512, seed=CALIB_SEED, progress=False) / "images"
        images, truth = None, None
        for variant in VARIANTS:
            if wanted and not any(w.lower() in variant.name.lower() for w in wanted):
                continue
            if target not in variant.devices:
                not_run.append({"variant": variant.name, "reason": variant.reason})
                print(f"not run: {variant.name}: {variant.reason}", flush=True)
                continue
            started = time.perf_counter()
            path = build_variant(variant, args.checkpoint, work, calib_dir, args.device)
            engine = load_engine(path, device=args.device, precision=variant.precision)
            build_s[variant.name] = round(time.perf_counter() - started, 2)
            if images is None:
                images, truth = heldout(args.dice_n, engine.spec.height)
            try:
                with tf32(not variant.strict_fp32, args.device):
                    rows = [row for n in samples for row in bench_engines([(variant.name, engine)], batches, n)]
                    score = mean_dice(engine, images, truth)
            finally:
                engine.close()
            speed += rows
            quality.append({"variant": variant.name, "best_fps": max(r.fps for r in rows), "dice": score,
                            "file": path.name, "precision": engine.spec.precision})
            print(format_table(rows), flush=True)
    reference = next((q["dice"] for q in quality if q["variant"] == "FP32 torch"), float("nan"))
    for q in quality:
        q["deviation"] = q["dice"] - reference

    speed_table = format_table(speed)
    quality_table = "\n".join(
        ["| variant | best FPS | Dice | vs FP32 |", "|---|---:|---:|---:|"]
        + [f"| {q['variant']} | {q['best_fps']:.1f} | {q['dice']:.4f} | {q['deviation']:+.4f} |" for q in quality]
        + [f"| {n['variant']} | not run | | {n['reason']} |" for n in not_run]
    )
    print("\n" + speed_table + "\n\n" + quality_table)
    command = " ".join(["python", *sys.argv])
    result = report(speed, command, args.device, quality=quality, not_run=not_run, build_or_load_s=build_s,
                    checkpoint=str(args.checkpoint), dice_n=args.dice_n, heldout_seed=HELDOUT_SEED,
                    calibration={"method": "minmax", "images": args.calib_n, "seed": CALIB_SEED})
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = result["date"].replace(":", "").replace("-", "")[:15]
    base = args.out / f"study_tables_{target}_{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    header = (f"# Study tables, {target} ({result['gpu'] or result['machine']['cpu']}), {result['date']}\n\n"
              f"Command: `{command}`\n\nVersions: {json.dumps(result['versions'])}\n\n")
    base.with_suffix(".md").write_text(header + "## Speed (engine-only)\n\n" + speed_table
                                       + "\n\n## Dice (held-out synthetic, n=" + str(args.dice_n) + ")\n\n"
                                       + quality_table + "\n")
    print(f"wrote {base}.json and .md")


if __name__ == "__main__":
    main()
