"""FP32 vs FP16 vs INT8 (MinMax) vs INT8 uncalibrated on the CPU, demo model, in one run.

    python benchmarks/cpu_precisions.py                      # engines/demo/unet_w16.onnx, batch 8

Builds, into a temporary folder, from the FP32 ONNX model:
  FP16                 toolchain.fp16.convert_fp16
  INT8 MinMax          quantize_int8, calibrated on --calib-count synthetic 512x512 images written
                       as PNG (seed --calib-seed, not the evaluation seed), decoded as the producer does
  INT8 no calibration  quantize_int8 with calib=None: ranges from uniform noise (data-free)
each in both Q/DQ layouts: "tensorrt" (the default, portable: int8 symmetric, zero point 0) and
"cpu" (ONNX Runtime's fast CPU form: uint8 asymmetric activations, int32 bias). Then, with every
engine loaded at once:
  * engine-only FPS at batch 8 (toolchain.bench, `slots` batches in flight), --rounds short rounds
    interleaved across engines; the fastest round is reported (on a shared machine other work only
    slows a round down, so the best round estimates the uncontended rate; --statistic median for
    the middle one). Both, and every round, are in the JSON. Compare ratios within one run;
  * Dice vs ground truth on --eval-n held-out synthetic images (seed --eval-seed) and the masks'
    agreement with the FP32 masks (foreground Dice between the two masks, and pixel agreement).
Diagnostic INT8 variants are timed in the same run (no quantization pre-processing, per-tensor
weights, QOperator format; --no-diagnosis skips them). If INT8 (default layout) is not faster than
FP32, ONNX Runtime's per-op profile and optimized graph of FP32 and both INT8 layouts say where the
time goes, and the output says why. Prints a table last and writes
JSON (date, machine, versions, command) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engines  # noqa: E402
from common.metrics import dice  # noqa: E402
from engines.base import EngineSpec, infer, metadata_path  # noqa: E402
from engines.onnx_engine import OnnxEngine, normalize_array  # noqa: E402
from engines.versions import built_with  # noqa: E402
from toolchain.bench import bench_engines, format_table, machine_info  # noqa: E402
from toolchain.fp16 import convert_fp16  # noqa: E402
from toolchain.int8 import quantize_int8  # noqa: E402
from toolchain.synth import generate, write_dataset  # noqa: E402

EVAL_SEED = 1_000_003


def write_calibration_pngs(folder: Path, n: int, size: int, seed: int) -> Path:
    """n synthetic images as 8-bit PNGs (what a user's calibration folder looks like); returns their folder."""
    return write_dataset(folder, n, size, seed, progress=False) / "images"


def diagnosis_variant(source: Path, out: Path, calib_dir: Path, count: int, *, preprocess: bool = True,
                      **overrides) -> Path:
    """Diagnosis only: an INT8 file quantized like toolchain.int8's "tensorrt" layout but with one thing
    changed: `preprocess=False` skips quant_pre_process; `overrides` replace quantize_static arguments
    (e.g. per_channel=False, or quant_format=QOperator with uint8 activations: ONNX Runtime only)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from toolchain.int8 import CalibrationReader, calibration_batches, calibration_images, quant_options
    from toolchain.onnx_precision import quiet

    spec = EngineSpec.read_beside(source)
    images, _ = calibration_images(calib_dir, spec.height, spec.width, count)
    ready = source
    with quiet():
        if preprocess:
            ready = out.with_name(out.stem + "_pre.onnx")
            quant_pre_process(str(source), str(ready))
        options = {**quant_options("tensorrt", onnx.load(str(ready), load_external_data=False)), **overrides}
        if not options["per_channel"]:
            options["extra_options"] = {k: v for k, v in options["extra_options"].items()
                                        if k != "TensorQuantOverrides"}
        quantize_static(str(ready), str(out), CalibrationReader(calibration_batches(images, spec, 4), spec.input_name),
                        calibrate_method=CalibrationMethod.MinMax, **options)
    spec = EngineSpec.from_dict({**json.loads(spec.to_json()), "precision": "int8"})
    metadata_path(out).write_text(spec.to_json() + "\n")
    return out


def qoperator_overrides() -> dict:
    """quantize_static arguments of the QOperator diagnosis (QLinearConv nodes, uint8 activations)."""
    from onnxruntime.quantization import QuantFormat, QuantType

    return {"quant_format": QuantFormat.QOperator, "activation_type": QuantType.QUInt8,
            "extra_options": {"CalibStridedMinMax": 1}}


def profile_ops(path: Path, spec: EngineSpec, images: np.ndarray, runs: int = 2) -> dict[str, float]:
    """ONNX Runtime CPU per-op-type kernel time, ms per batch of uint8 images (N, H, W), warm-up run excluded."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        x = normalize_array(images, spec.normalization)
        for _ in range(runs + 1):
            session.run(None, {spec.input_name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = run_starts[1] if len(run_starts) > runs else 0  # skip the first (warm-up) run
    total: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= after:
            total[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / runs / 1000.0, 1) for op, us in total.most_common()}


def optimized_ops(path: Path) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime CPU actually runs (after its graph optimizations)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    return dict(collections.Counter(node.op_type for node in model.graph.node).most_common())


def masks_of(engine: OnnxEngine, images: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([infer(engine, images[i : i + batch]) for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=engines.DEMO_ONNX, help="FP32 ONNX model (with its .json)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=24, help="images per timing round and engine")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timing rounds, interleaved across engines; the best is reported (see --statistic)")
    parser.add_argument("--statistic", choices=("best", "median"), default="best",
                        help="best: fastest round (contention on a shared machine only slows a round down); "
                             "median: middle round")
    parser.add_argument("--calib-count", type=int, default=64)
    parser.add_argument("--calib-seed", type=int, default=271828, help="seed of the calibration PNGs")
    parser.add_argument("--eval-n", type=int, default=32)
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the diagnostic INT8 variants")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/cpu_precisions.py", *sys.argv[1:]])
    started = time.perf_counter()
    load_before = os.getloadavg()

    source = args.onnx.resolve()
    spec = EngineSpec.read_beside(source)
    with tempfile.TemporaryDirectory(prefix="cpu_precisions-") as tmp_name:
        tmp = Path(tmp_name)
        calib_dir = write_calibration_pngs(tmp / "calib", args.calib_count, spec.height, args.calib_seed)
        print(f"calibration: {args.calib_count} synthetic PNGs, seed {args.calib_seed}", flush=True)

        variants: list[dict] = [{"variant": "FP32 ONNX Runtime", "file": source, "build_s": 0.0, "kind": "main"}]

        def add(name: str, kind: str, fn, *a, **kw) -> None:
            t0 = time.perf_counter()
            path = fn(*a, **kw)
            path = path.path if hasattr(path, "path") else path
            variants.append({"variant": name, "file": path, "build_s": round(time.perf_counter() - t0, 1),
                             "kind": kind})
            print(f"built {name} in {variants[-1]['build_s']} s", flush=True)

        add("FP16 (io float32)", "main", convert_fp16, source, tmp / "fp16.onnx")
        add("INT8 MinMax (tensorrt Q/DQ)", "main", quantize_int8, source, tmp / "int8.onnx", calib_dir,
            count=args.calib_count)
        add("INT8 no calibration (tensorrt Q/DQ)", "main", quantize_int8, source, tmp / "int8_nocal.onnx", None,
            count=args.calib_count)
        add("INT8 MinMax (cpu Q/DQ)", "main", quantize_int8, source, tmp / "int8_cpu.onnx", calib_dir,
            count=args.calib_count, target="cpu")
        add("INT8 no calibration (cpu Q/DQ)", "main", quantize_int8, source, tmp / "int8_cpu_nocal.onnx", None,
            count=args.calib_count, target="cpu")
        if not args.no_diagnosis:
            add("diag: INT8 tensorrt Q/DQ, no pre-processing", "diagnosis", diagnosis_variant, source,
                tmp / "int8_nopre.onnx", calib_dir, args.calib_count, preprocess=False)
            add("diag: INT8 tensorrt Q/DQ, per-tensor weights", "diagnosis", diagnosis_variant, source,
                tmp / "int8_pertensor.onnx", calib_dir, args.calib_count, per_channel=False)
            add("diag: INT8 QOperator (uint8, ORT only)", "diagnosis", diagnosis_variant, source,
                tmp / "int8_qop.onnx", calib_dir, args.calib_count, **qoperator_overrides())

        loaded = [(v["variant"], OnnxEngine(v["file"])) for v in variants]
        try:
            # quality first (also warms every session), then timing
            pairs = list(generate(args.eval_n, spec.height, args.eval_seed))
            images = np.stack([p[0] for p in pairs])
            truth = np.stack([p[1] for p in pairs])
            all_masks = {name: masks_of(engine, images, args.batch) for name, engine in loaded}
            ref = all_masks[variants[0]["variant"]]
            for v in variants:
                masks = all_masks[v["variant"]]
                v["dice_truth"] = float(np.mean([dice(m, t) for m, t in zip(masks, truth, strict=True)]))
                v["dice_vs_fp32_masks"] = float(np.mean([dice(m, r) for m, r in zip(masks, ref, strict=True)]))
                v["pixel_agreement_fp32"] = float((masks == ref).mean())
            print("quality measured; timing ...", flush=True)
            rows = bench_engines(loaded, [args.batch], args.samples, warmup=2, rounds=args.rounds,
                                 file_names=[Path(v["file"]).name for v in variants])
        finally:
            for _, engine in loaded:
                engine.close()

        for v, row in zip(variants, rows, strict=True):
            best = max(row.runs)
            fps = best if args.statistic == "best" else row.fps
            v.update(batch=row.batch, samples=row.samples, runtime_s=row.samples / fps, fps=fps, runs=list(row.runs),
                     fps_best=best, fps_median=row.fps)
            v["spec_built_with"] = EngineSpec.read_beside(Path(v["file"])).built_with
        fp32 = variants[0]
        by_name = {v["variant"]: v for v in variants}
        int8 = by_name["INT8 MinMax (tensorrt Q/DQ)"]
        int8_cpu = by_name["INT8 MinMax (cpu Q/DQ)"]
        profiles = {}
        runtime_graphs = {}
        verdict = []
        if int8["fps"] <= fp32["fps"]:
            prof_images = images[: args.batch]
            for v in (fp32, int8, int8_cpu):
                profiles[v["variant"]] = profile_ops(Path(v["file"]), spec, prof_images)
                runtime_graphs[v["variant"]] = optimized_ops(Path(v["file"]))
            p32, p8 = profiles[fp32["variant"]], profiles[int8["variant"]]
            overhead = sum(p8.get(op, 0.0) for op in ("DequantizeLinear", "QuantizeLinear", "Relu", "Transpose",
                                                      "Concat", "MaxPool"))
            verdict = [
                f"INT8 with the portable TensorRT Q/DQ layout is not faster than FP32 on ONNX Runtime CPU "
                f"({int8['fps']:.2f} vs {fp32['fps']:.2f} img/s at batch {args.batch}).",
                f"Why (ONNX Runtime profile, ms per batch of {args.batch}): its int8 convolutions are fast "
                f"(QLinearConv {p8.get('QLinearConv', 0):.0f} ms vs FP32 Conv {p32.get('Conv', 0):.0f} ms), but "
                f"{overhead:.0f} ms go to DequantizeLinear {p8.get('DequantizeLinear', 0):.0f}, QuantizeLinear "
                f"{p8.get('QuantizeLinear', 0):.0f}, Relu {p8.get('Relu', 0):.0f}, "
                f"Transpose {p8.get('Transpose', 0):.0f}, "
                f"Concat {p8.get('Concat', 0):.0f}, MaxPool {p8.get('MaxPool', 0):.0f}: with int8 zero point 0 "
                "(what TensorRT requires) a Relu does not vanish into the quantized range, so ONNX Runtime "
                "keeps each Relu, Concat and MaxPool in float between extra Dequantize/Quantize passes over "
                "full-size activations; ConvTranspose stays float in every layout (no int8 kernel).",
                f"The ONNX Runtime CPU layout (--target cpu: uint8 activations, int32 bias) "
                f"{'removes that' if int8_cpu['fps'] > fp32['fps'] else 'does not fix it here'}: "
                f"{int8_cpu['fps']:.2f} img/s, {int8_cpu['fps'] / fp32['fps']:.2f}x FP32 "
                "(TensorRT refuses that layout, so it is a separate file: engines build --target cpu).",
            ]
            diag = [v for v in variants if v["kind"] == "diagnosis"]
            if diag:
                verdict.append("Diagnostic rows, same run: " + "; ".join(
                    f"{v['variant'].removeprefix('diag: ')} {v['fps']:.2f} img/s ({v['fps'] / fp32['fps']:.2f}x FP32)"
                    for v in diag) + ".")

    table = format_table(
        [_row(v) for v in variants],
        extra={
            "Dice": [f"{v['dice_truth']:.4f}" for v in variants],
            "vs FP32": [f"{v['dice_truth'] - fp32['dice_truth']:+.4f}" for v in variants],
            "Dice vs FP32 masks": [f"{v['dice_vs_fp32_masks']:.4f}" for v in variants],
            "x FP32 FPS": [f"{v['fps'] / fp32['fps']:.2f}" for v in variants],
        },
    )
    record = {
        "benchmark": "cpu_precisions",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "gpu": None,
        "versions": built_with("cpu"),
        "command": command,
        "model": {"file": str(args.onnx), "spec_precision": spec.precision, "size": [spec.height, spec.width],
                  "unet_width": spec.built_with.get("unet_width")},
        "calibration": {"images": args.calib_count, "seed": args.calib_seed, "kind": "synthetic PNG"},
        "evaluation": {"images": args.eval_n, "seed": args.eval_seed},
        "timing": {"batch": args.batch, "samples_per_round": args.samples, "rounds": args.rounds,
                   "statistic": f"{args.statistic} of {args.rounds} rounds, interleaved across engines"},
        "rows": [{k: (str(v) if isinstance(v, Path) else v) for k, v in row.items() if k != "file"}
                 | {"file": Path(row["file"]).name} for row in variants],
        "profile_ms_per_batch": profiles,
        "onnxruntime_cpu_graph_ops": runtime_graphs,
        "verdict": verdict,
        "table": table,
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    out = args.out / f"cpu_precisions_{stamp}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    if profiles:
        print("\nONNX Runtime CPU profile, ms per batch of", args.batch)
        for name, ops in profiles.items():
            print(f"  {name}: " + ", ".join(f"{op} {ms:.0f}" for op, ms in list(ops.items())[:8]))
        print("Operators ONNX Runtime CPU runs (after its graph optimizations):")
        for name, ops in runtime_graphs.items():
            print(f"  {name}: " + ", ".join(f"{op} {n}" for op, n in ops.items()))
    spread = max(max(v["runs"]) / min(v["runs"]) for v in variants)
    if spread > 1.3:
        warning = (f"note: timings varied up to {spread:.2f}x between rounds of one engine (the machine was busy; "
                   f"load average before/after in the JSON); reported: the {args.statistic} round"
                   + ("; rerun on a quiet machine before comparing" if args.statistic == "median" else ""))
        print(warning)
        record["warning"] = warning
        out.write_text(json.dumps(record, indent=2) + "\n")
    for line in verdict:
        print(line)
    print(f"\nwrote {out}\n")
    print(table)


def _row(v: dict):
    from toolchain.bench import BenchRow

    return BenchRow(v["variant"], v["batch"], v["samples"], v["runtime_s"], v["fps"])


if __name__ == "__main__":
    main()
