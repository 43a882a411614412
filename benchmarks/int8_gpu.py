"""INT8 on the GPU: the cuDNN INT8 engine against the compiled FP16 engine, and its masks' quality.

    python benchmarks/int8_gpu.py --work /tmp/int8 [--skip-fp16] [--dice-n 64] [--e2e 16000]

Speed (width-64 U-Net, 512x512, batch 8, random weights: speed does not depend on their values):
the FP32 checkpoint -> FP32 ONNX -> INT8 Q/DQ ONNX (MinMax on --calib-n synthetic images) ->
`.cudnn` (built and timed on this GPU; plans for batch 8 only, or for every batch size with --e2e),
and the compiled FP16 engine (`.ptc`) from the same checkpoint; the INT8 engine with its default
glue (Triton kernels on CUDA) and with the torch ops (engines.int8_glue), and the checkpoint itself
in FP32 and FP16 torch; all through `toolchain.bench.throughput` (engine alone: uint8 in, masks out,
two batches in flight), alternated --rounds times, medians reported.

Files to masks (--e2e IMAGES): benchmarks/scale_out.py with the INT8 engine as users build it
(`engines build ... --target cuda`: plans for every batch size), real commands, Redis AOF on, jobs of
8, the Triton kernels compiled afresh by the worker; its worker start-to-ready time, img/s against the
engine alone in that run, the worker's CPU per image and Redis's main-thread share. --e2e-args adds
scale_out.py options (e.g. "--stream 2000 --engine-slots 3"). What the producer imports is compiled
to bytecode first, as `pip install` leaves it (the GPU machine's packages come without it).

Quality (the trained width-16 demo checkpoint, 512x512, held-out synthetic images, the study's
criterion): Dice of FP32 torch, FP16 torch, INT8 cuDNN (MinMax calibration on real-looking images)
and INT8 cuDNN uncalibrated (data-free ranges), and the share of mask pixels where INT8 cuDNN agrees
with ONNX Runtime's INT8 masks from the same Q/DQ file.

Writes benchmarks/results/int8_gpu_<gpu>_<timestamp>.json (or --out-json) and prints a table.
Every engine file is built in --work (kept: a later run on the same machine reuses them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.metrics import dice  # noqa: E402
from engines import DEMO_CHECKPOINT  # noqa: E402
from engines.base import EngineSpec, infer  # noqa: E402
from engines.checkpoint import save_checkpoint  # noqa: E402
from engines.loader import load_engine  # noqa: E402
from engines.versions import package_version  # noqa: E402
from toolchain.bench import bench_images, throughput  # noqa: E402
from toolchain.build import build  # noqa: E402
from toolchain.synth import generate, write_dataset  # noqa: E402

HELDOUT_SEED = 1000003
CALIB_SEED = 4242


def log(message: str) -> None:
    """One progress line, flushed."""
    print(message, flush=True)


def timed_build(source: Path, output: Path, batch_sizes: tuple[int, ...] = (), **options: Any) -> float:
    """Build `output` unless it exists (a `.cudnn` with plans for `batch_sizes` if given); seconds spent."""
    if output.exists():
        return 0.0
    started = time.perf_counter()
    if batch_sizes:
        from toolchain.cudnn_build import build_cudnn_int8

        build_cudnn_int8(source, output, batch_sizes=batch_sizes)
    else:
        build(source, output, **options)
    spent = time.perf_counter() - started
    log(f"built {output.name} in {spent:.0f} s")
    return spent


def open_engine(path: Path, option: str) -> Any:
    """A `.cudnn` file with the glue `option` ("auto", "torch", "triton"); a `.pt` checkpoint in the precision
    `option` ("fp32", "fp16"); any other engine file as a worker loads it."""
    if path.suffix == ".cudnn":
        from engines.cudnn_int8 import CudnnInt8Engine

        return CudnnInt8Engine(path, glue=option)
    return load_engine(path, device="cuda", precision=option if path.suffix == ".pt" else None)


def engine_alone(files: dict[str, tuple[Path, str]], rounds: int, iters: int) -> dict[str, Any]:
    """Load time and img/s (batch 8, two in flight) of each (engine file, option of open_engine), alternated over
    `rounds`."""
    images = bench_images(EngineSpec(), 8)
    loads: dict[str, float] = {}
    runs: dict[str, list[float]] = {name: [] for name in files}
    engines = {}
    try:
        for name, (path, glue) in files.items():
            started = time.perf_counter()
            engines[name] = open_engine(path, glue)
            loads[name] = time.perf_counter() - started
            log(f"{name}: loaded in {loads[name]:.1f} s ({getattr(engines[name], 'load_timings', {})})")
        for _ in range(rounds):
            for name, engine in engines.items():
                runs[name].append(throughput(engine, images, iters=iters, warmup=20))
                log(f"{name}: {runs[name][-1]:.0f} img/s")
    finally:
        for engine in engines.values():
            engine.close()
    return {"load_s": loads, "runs_img_s": runs, "median_img_s": {k: statistics.median(v) for k, v in runs.items()},
            "glue": {name: getattr(engine, "glue_name", "") for name, engine in engines.items()}}


def speed(work: Path, calib: Path, calib_n: int, skip_fp16: bool, rounds: int, iters: int,
          save: Any, all_batch_sizes: bool = False) -> dict[str, Any]:
    """Engine-alone img/s of the width-64 INT8 cuDNN and compiled FP16 engines (INT8 alone first, then both);
    the INT8 engine with plans for batch 8 only, or for every batch size (as users build it) if
    `all_batch_sizes`."""
    import torch

    from engines.unet import UNet, UNetConfig

    ckpt = work / "unet_w64.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        save_checkpoint(ckpt, UNet(UNetConfig(width=64)).eval(), EngineSpec())
    result: dict[str, Any] = {"builds_s": {}}
    builds = result["builds_s"]
    builds["onnx_s"] = timed_build(ckpt, work / "w64.onnx", precision="fp32")
    builds["int8_onnx_s"] = timed_build(work / "w64.onnx", work / "w64_int8.onnx", precision="int8",
                                        calib=str(calib), calib_count=calib_n)
    if all_batch_sizes:  # the file the files-to-masks phase runs
        cudnn = work / "w64_int8.cudnn"
        builds["cudnn_s"] = timed_build(work / "w64_int8.onnx", cudnn, target="cuda")
    else:  # plans for batch 8 only: the only size timed here, a shorter build
        cudnn = work / "w64_int8_b8.cudnn"
        builds["cudnn_s"] = timed_build(work / "w64_int8.onnx", cudnn, target="cuda", batch_sizes=(8,))
    files = {"int8": (cudnn, "auto"), "int8_torch_glue": (cudnn, "torch")}  # the default glue, and torch ops
    result["int8_alone"] = engine_alone(files, 1, iters)
    result["int8_img_s"] = result["int8_alone"]["median_img_s"]["int8"]
    result["int8_step_profile"] = {glue: step_profile(cudnn, glue) for glue in ("torch", "triton")}
    save(result)
    if skip_fp16:
        return result
    builds["ptc_s"] = timed_build(ckpt, work / "w64.ptc", compile=True, precision="fp16")
    files["fp16"] = (work / "w64.ptc", "")
    files["fp32_torch"], files["fp16_torch"] = (ckpt, "fp32"), (ckpt, "fp16")
    both = engine_alone(files, rounds, iters)
    result.update(both)
    result["int8_img_s"] = both["median_img_s"]["int8"]
    result["fp16_compiled_img_s"] = both["median_img_s"]["fp16"]
    result["int8_over_fp16"] = result["int8_img_s"] / result["fp16_compiled_img_s"]
    result["int8_torch_glue_over_fp16"] = both["median_img_s"]["int8_torch_glue"] / result["fp16_compiled_img_s"]
    result["fp32_torch_img_s"] = both["median_img_s"]["fp32_torch"]
    result["fp16_torch_img_s"] = both["median_img_s"]["fp16_torch"]
    return result


def step_profile(path: Path, glue: str) -> dict[str, Any]:
    """Where one batch of 8 spends its GPU time in the INT8 engine: each step run eagerly, summed by kind."""
    from engines.cudnn_int8 import CudnnInt8Engine

    try:
        with CudnnInt8Engine(path, glue=glue) as engine:
            glue = engine.glue_name
            rows = engine.profile_steps()
    except Exception as exc:  # a diagnostic: its failure is recorded, the measurement goes on
        log(f"step profile failed: {exc!r}")
        return {"error": repr(exc)}
    by_kind: dict[str, float] = {}
    for row in rows:
        key = row["kind"] + (f"_{row['precision']}" if row["precision"] else "")
        by_kind[key] = by_kind.get(key, 0.0) + row["ms"]
    total = sum(by_kind.values())
    steps = ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items())
    log(f"step profile ({glue} glue), ms per batch of 8 (eager): {steps}; total {total:.3f}")
    return {"glue": glue, "steps": rows, "ms_by_kind": by_kind, "total_ms": total}


def quality(work: Path, calib: Path, calib_n: int, n: int, uncalibrated: bool = True) -> dict[str, Any]:
    """Dice on held-out images of the trained demo model in FP32, FP16 and INT8 cuDNN (calibrated or not)."""
    onnx = work / "demo.onnx"
    timed_build(DEMO_CHECKPOINT, onnx, precision="fp32")
    timed_build(onnx, work / "demo_int8.onnx", precision="int8", calib=str(calib), calib_count=calib_n)
    # plans for batch 8 only (the images are scored in batches of 8): a shorter build, the same masks
    timed_build(work / "demo_int8.onnx", work / "demo_int8_b8.cudnn", batch_sizes=(8,))
    pairs = list(generate(n, size=512, seed=HELDOUT_SEED))
    images, truth = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    variants: dict[str, tuple[Path, str, str | None]] = {
        "fp32": (DEMO_CHECKPOINT, "cuda", "fp32"),
        "fp16": (DEMO_CHECKPOINT, "cuda", "fp16"),
        "int8": (work / "demo_int8_b8.cudnn", "cuda", None),
        "onnx_int8": (work / "demo_int8.onnx", "cpu", None),
    }
    if uncalibrated:
        timed_build(onnx, work / "demo_int8_nocal.onnx", precision="int8", calib="none", calib_count=calib_n)
        timed_build(work / "demo_int8_nocal.onnx", work / "demo_int8_nocal_b8.cudnn", batch_sizes=(8,))
        variants["int8_uncalibrated"] = (work / "demo_int8_nocal_b8.cudnn", "cuda", None)
    masks: dict[str, np.ndarray] = {}
    for name, (path, device, precision) in variants.items():
        import torch

        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with load_engine(path, device=device, precision=precision) as engine:
            masks[name] = np.concatenate([infer(engine, images[i:i + 8]) for i in range(0, n, 8)])
    scores = {f"dice_{k}": float(np.mean([dice(m, t) for m, t in zip(v, truth, strict=True)]))
              for k, v in masks.items() if k != "onnx_int8"}
    scores["int8_pixel_agreement_with_onnx_int8"] = float(np.mean(masks["int8"] == masks["onnx_int8"]))
    scores["dice_onnx_int8_cpu"] = float(np.mean([dice(m, t) for m, t in zip(masks["onnx_int8"], truth, strict=True)]))
    scores["dice_images"] = n
    return scores


def bytecode_env() -> dict[str, str]:
    """This environment with the producer's imports compiled to bytecode (into PYTHONPYCACHEPREFIX), as a
    `pip install` leaves them: without it, each `producer enqueue` of the timed run recompiles what it imports
    before its first job. The PYTHONPATH folders (this tree, the carried wheels) are compiled whole; the
    packages the producer imports from elsewhere are compiled by importing them once. torch is left as the
    machine has it: only the workers import it, and they are ready before the timed run starts."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("PYTHONPYCACHEPREFIX", "/tmp/pycache")
    roots = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] or [str(ROOT)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *roots], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    subprocess.run([sys.executable, "-c", "import producer.cli, producer.reference_cli"], cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    log(f"compiled bytecode in {time.perf_counter() - started:.0f} s")
    return env


def end_to_end(work: Path, images: int, logs: Path | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    """Files to masks with the width-64 INT8 engine (every batch size, as users build it) through
    benchmarks/scale_out.py (with the options `extra`); its headline figures, and its own JSON under "e2e"
    (its logs copied to `logs`)."""
    engine = work / "w64_int8.cudnn"
    build_s = timed_build(work / "w64_int8.onnx", engine, target="cuda")
    report = work / "scale_out_int8.json"
    env = {**bytecode_env(), "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton_e2e_")}  # the worker compiles afresh
    argv = [sys.executable, str(ROOT / "benchmarks" / "scale_out.py"), "--engine", str(engine), "--images",
            str(images), "--gpus", "1", "--redis-io-threads", "4", "--out-json", str(report), *(extra or [])]
    if logs:
        argv += ["--save-logs", str(logs)]
    log(" ".join(argv))
    subprocess.run(argv, check=True, env=env)
    run = json.loads(report.read_text())
    phase = run["raw"]["phases"][0]
    return {"worker_ready_s": run["worker_start_s"], "e2e_img_s": run["e2e_img_s"],
            "e2e_engine_img_s": run["engine_img_s"], "e2e_over_engine": run["e2e_vs_engine"],
            "e2e_worker_cpu_ms_per_image": phase.get("worker_cpu_ms_per_image"),
            "e2e_redis_main_thread_busy": phase.get("redis_main_thread_busy"),
            "e2e_redis_main_ms_per_image": phase.get("redis_main_thread_cpu_s_per_1000"),
            "e2e_cpu_busy_while_producing": phase.get("cpu_busy_while_producing"),
            "e2e_cpu_busy_after_producing": phase.get("cpu_busy_after_producing"),
            "e2e_worker_main_thread_shares": phase.get("worker_main_thread_shares"),
            "e2e_engine_build_s": build_s, "e2e": run}


def gpu_name() -> str:
    """This machine's CUDA device name."""
    import torch

    return torch.cuda.get_device_name(0)


def main() -> None:
    """Parse the options, run the phases, write the JSON and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8_gpu"))
    parser.add_argument("--calib-n", type=int, default=32, help="calibration images (synthetic, their own seed)")
    parser.add_argument("--dice-n", type=int, default=64, help="held-out images scored")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per engine")
    parser.add_argument("--iters", type=int, default=150, help="batches of 8 per timing round")
    parser.add_argument("--skip-fp16", action="store_true", help="no compiled FP16 engine (it takes minutes to build)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true", help="quality only (speed measured in another run)")
    parser.add_argument("--skip-uncalibrated", action="store_true", help="no data-free INT8 row in the quality phase")
    parser.add_argument("--e2e", type=int, default=0, metavar="IMAGES",
                        help="also files to masks through the real commands with this many images (0: skip)")
    parser.add_argument("--e2e-logs", type=Path, default=None, help="copy the files-to-masks run's logs here")
    parser.add_argument("--e2e-args", default="", help=(
        "more benchmarks/scale_out.py options for --e2e, one string, e.g. \"--stream 2000 --engine-slots 3\""))
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--update", action="store_true", help=(
        "add this run's phases to the existing --out-json (e.g. --skip-speed --skip-quality --e2e N after a run "
        "that measured speed and quality on the same machine)"))
    args = parser.parse_args()
    if args.update and not (args.out_json and args.out_json.exists()):
        parser.error("--update needs an existing --out-json")
    args.work.mkdir(parents=True, exist_ok=True)
    calib = args.work / "calib"
    if not calib.exists():
        write_dataset(calib, args.calib_n, size=512, seed=CALIB_SEED, progress=False)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": socket.gethostname(), "gpu": gpu_name(), "batch": 8,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"python": platform.python_version(), "torch": package_version("torch"),
                     "nvidia-cudnn-frontend": package_version("nvidia-cudnn-frontend"),
                     "onnxruntime": package_version("onnxruntime"),
                     "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()},
    }
    import torch

    result["versions"]["cudnn"] = str(torch.backends.cudnn.version())
    if args.update:  # one JSON from two runs on one machine: the earlier run's fields, then this one's
        earlier = json.loads(args.out_json.read_text())
        if earlier.get("machine") != result["machine"] or earlier.get("gpu") != result["gpu"]:
            parser.error(f"--update: {args.out_json} was measured on {earlier.get('machine')} ({earlier.get('gpu')})")
        result = {**earlier, "command": f"{earlier['command']} && {result['command']}",
                  "dates": [earlier["date"], result["date"]]}
    out = args.out_json or ROOT / "benchmarks" / "results" / (
        f"int8_gpu_{result['gpu'].lower().replace(' ', '_')}_{dt.datetime.now():%Y%m%dT%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(speed_result: dict[str, Any]) -> None:  # after each phase: a run cut short keeps what it measured
        result["speed"] = speed_result
        for key in ("fp16_compiled_img_s", "int8_img_s", "int8_over_fp16", "int8_torch_glue_over_fp16",
                    "fp32_torch_img_s", "fp16_torch_img_s"):
            if key in speed_result:
                result[key] = speed_result[key]
        out.write_text(json.dumps(result, indent=1))

    if not args.skip_speed:
        save(speed(args.work, calib / "images", args.calib_n, args.skip_fp16, args.rounds, args.iters, save,
                   all_batch_sizes=bool(args.e2e)))
    if not args.skip_quality:
        result.update(quality(args.work, calib / "images", args.calib_n, args.dice_n, not args.skip_uncalibrated))
        out.write_text(json.dumps(result, indent=1))
    if args.e2e:
        if not (args.work / "w64_int8.onnx").exists():
            parser.error("--e2e needs the width-64 INT8 ONNX that the speed phase builds in --work")
        result.update(end_to_end(args.work, args.e2e, args.e2e_logs, shlex.split(args.e2e_args)))
        out.write_text(json.dumps(result, indent=1))
    log(f"\nwrote {out}")
    for key in ("gpu", "fp32_torch_img_s", "fp16_torch_img_s", "fp16_compiled_img_s", "int8_img_s", "int8_over_fp16",
                "int8_torch_glue_over_fp16", "dice_fp32", "dice_fp16", "dice_int8", "dice_int8_uncalibrated",
                "int8_pixel_agreement_with_onnx_int8", "worker_ready_s", "e2e_img_s", "e2e_over_engine",
                "e2e_worker_cpu_ms_per_image", "e2e_redis_main_thread_busy"):
        if key in result:
            value = result[key]
            log(f"{key:40s} {value:.4f}" if isinstance(value, float) else f"{key:40s} {value}")


if __name__ == "__main__":
    main()
