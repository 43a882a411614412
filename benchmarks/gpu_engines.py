"""Engine-only throughput of the GPU engines, in one run on one CUDA device.

    python benchmarks/gpu_engines.py [--out DIR] [--iters 30] [--repeats 3]
    python benchmarks/gpu_engines.py --models w64 --eager fp16 --batch-sizes 1,2,4,8 --batches 8,4,2,1

Models: a random-weight width-64 U-Net (the study's size; weights do not change speed) and the
shipped width-16 demo model, both 1x512x512, 2 classes. Rows, at batch 8 and 1 (--batches adds more):
  torch FP32 eager, TF32 off | TF32 eager | torch AMP FP16 | FP16 channels_last eager | compiled FP16 (.ptc)
Each rate is the median of --repeats runs of --iters batches with the engine's 2 slots in flight
(toolchain.bench.throughput), uint8 in and uint8 masks out, as a worker runs them.
The compiled engine (static --batch-sizes, default 8; smaller batches run padded) is built in a fresh
process with empty inductor/triton cache directories (cold
build time), then loaded in another fresh process with other empty cache directories (warm load
time: everything comes from the .ptc), which times it and saves its masks; mask agreement with the
FP16 eager engine is reported. Prints a table last and writes JSON (date, GPU, versions, command)
to --out (default: $OUT when set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engines import DEMO_CHECKPOINT  # noqa: E402
from engines.base import EngineSpec, infer  # noqa: E402
from engines.checkpoint import save_checkpoint  # noqa: E402
from engines.unet import UNet, UNetConfig  # noqa: E402
from toolchain.bench import throughput  # noqa: E402
from toolchain.synth import generate  # noqa: E402

TARGET = 1100.0  # img/s, compiled FP16, width 64, batch 8, on an H200 (DESIGN.md bar)


def _rate(engine, images: np.ndarray, iters: int, repeats: int) -> float:
    rates = [throughput(engine, images, iters=iters, warmup=3 if r == 0 else 1) for r in range(repeats)]
    return statistics.median(rates)


def _set_tf32(on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


EAGER = {"fp32": ("FP32 eager, TF32 off", "fp32", False), "tf32": ("TF32 eager", "fp32", True),
         "amp": ("torch AMP FP16", "amp", True), "fp16": ("FP16 channels_last eager", "fp16", True)}


def eager_rows(ckpt: Path, images: np.ndarray, iters: int, repeats: int, variants: list[str],
               batches: list[int]) -> tuple[list[dict], np.ndarray]:
    """Rows for the eager variants; also the FP16 engine's masks of `images` (for agreement)."""
    from engines.torch_engine import TorchEngine

    rows, fp16_masks = [], None
    if "fp16" not in variants:
        variants = [*variants, "fp16"]  # its masks are the compiled engine's reference
    for key in variants:
        label, precision, tf32 = EAGER[key]
        _set_tf32(tf32)
        started = time.perf_counter()
        with TorchEngine(ckpt, device="cuda", precision=precision) as engine:
            load_s = time.perf_counter() - started
            row = {"variant": label, "precision": precision, "tf32": tf32, "load_s": round(load_s, 2)}
            for batch in batches:
                row[f"b{batch}_img_s"] = round(_rate(engine, images[:batch], iters, repeats), 1)
            if precision == "fp16":
                fp16_masks = infer(engine, images)
        rows.append(row)
        torch.cuda.empty_cache()
    _set_tf32(True)
    return rows, fp16_masks


def _child(args: list[str], cache_root: Path, timeout: float) -> dict:
    """Run this script in a fresh process with empty torch.compile caches; its last stdout line is JSON."""
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache_root / "triton")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(wall, 2)
    return result


def child_build(ckpt: str, out: str, sizes: str) -> dict:
    from toolchain.compile import build_compiled

    started = time.perf_counter()
    build_compiled(Path(ckpt), Path(out), batch_sizes=tuple(int(b) for b in sizes.split(",")))
    return {"build_s": round(time.perf_counter() - started, 2), "file_mb": round(Path(out).stat().st_size / 1e6, 1)}


def child_load(ptc: str, masks_out: str, iters: int, repeats: int, batches: str) -> dict:
    from engines.compiled_engine import CompiledTorchEngine

    started = time.perf_counter()
    engine = CompiledTorchEngine(Path(ptc))
    load_s = time.perf_counter() - started
    images = np.stack([img for img, _ in generate(8, 512, seed=1)])
    with engine:
        first = time.perf_counter()
        masks = infer(engine, images)
        first_batch_s = time.perf_counter() - first
        np.save(masks_out, masks)
        rates = {f"b{b}_img_s": round(_rate(engine, images[:int(b)], iters, repeats), 1) for b in batches.split(",")}
    return {"load_s": round(load_s, 2), "first_batch_after_load_s": round(first_batch_s, 3),
            "load_timings": {k: round(v, 2) for k, v in engine.load_timings.items()}, **rates}


def compiled_row(ckpt: Path, work: Path, fp16_masks: np.ndarray, iters: int, repeats: int, sizes: str,
                 batches: list[int]) -> dict:
    ptc = work / (ckpt.stem + ".ptc")
    build = _child(["--child-build", str(ckpt), str(ptc), sizes], work / f"cache_build_{ckpt.stem}", timeout=900)
    masks_file = work / (ckpt.stem + "_compiled_masks.npy")
    load = _child(["--child-load", str(ptc), str(masks_file), str(iters), str(repeats), ",".join(map(str, batches))],
                  work / f"cache_load_{ckpt.stem}", timeout=600)
    agreement = float((np.load(masks_file) == fp16_masks).mean())
    return {"variant": "compiled FP16 (.ptc)", "precision": "fp16", "tf32": True, "compiled_batch_sizes": sizes,
            **{k: v for k, v in load.items() if k.endswith("_img_s")},
            "cold_build_s": build["build_s"], "cold_build_process_s": build["process_wall_s"],
            "ptc_mb": build["file_mb"], "warm_load_s": load["load_s"],
            "warm_load_process_s": load["process_wall_s"], "warm_load_timings": load["load_timings"],
            "first_batch_after_load_s": load["first_batch_after_load_s"],
            "mask_agreement_vs_fp16_eager": round(agreement, 5)}


def _versions() -> dict:
    from engines.compiled_engine import triton_version

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()), "triton": triton_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compiled", action="store_true", help="skip the compiled engine rows")
    parser.add_argument("--models", default="w64,w16", help="comma list of w64 (random) and w16 (demo)")
    parser.add_argument("--eager", default="fp32,tf32,amp,fp16", help="eager variants: fp32,tf32,amp,fp16")
    parser.add_argument("--batch-sizes", default="8", help="static batch sizes the compiled engine is built for")
    parser.add_argument("--batches", default="8,1", help="batch sizes timed (8 and 1 are always included)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    gpu = torch.cuda.get_device_name()
    cap = ".".join(map(str, torch.cuda.get_device_capability()))
    print(f"{gpu} (sm {cap}), torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    images = np.stack([img for img, _ in generate(8, 512, seed=1)])
    batches = sorted({8, 1, *(int(b) for b in args.batches.split(","))}, reverse=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {"w64": None, "w16": DEMO_CHECKPOINT}
        for key in args.models.split(","):
            ckpt = models[key]
            if ckpt is None:
                torch.manual_seed(0)
                ckpt = save_checkpoint(work / "unet_w64.pt", UNet(UNetConfig(width=64)).eval(), EngineSpec())
            label = "width 64 (random weights)" if key == "w64" else "width 16 (demo, trained)"
            print(f"-- {label}", flush=True)
            rows, fp16_masks = eager_rows(ckpt, images, args.iters, args.repeats, args.eager.split(","), batches)
            for row in rows:
                print(f"   {row['variant']:<26} b8 {row['b8_img_s']:>8.1f}  b1 {row['b1_img_s']:>8.1f} img/s",
                      flush=True)
            if not args.no_compiled:
                row = compiled_row(ckpt, work, fp16_masks, args.iters, args.repeats, args.batch_sizes, batches)
                print(f"   {row['variant']:<26} b8 {row['b8_img_s']:>8.1f}  b1 {row['b1_img_s']:>8.1f} img/s "
                      f"(cold build {row['cold_build_s']} s, warm load {row['warm_load_s']} s)", flush=True)
                rows.append(row)
            for row in rows:
                row["model"] = key
            results.append({"model": key, "label": label, "rows": rows})

    w64_compiled = [r for m in results if m["model"] == "w64" for r in m["rows"] if r["variant"].startswith("compiled")]
    report = {
        "benchmark": "gpu_engines",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": {"name": gpu, "compute_capability": cap, "count": torch.cuda.device_count()},
        "machine": {"host": platform.node(), "platform": platform.platform(), "cores": os.cpu_count()},
        "versions": _versions(),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "settings": {"image": "1x512x512 uint8", "iters": args.iters, "repeats": args.repeats, "slots": 2,
                     "compiled_batch_sizes": args.batch_sizes, "batches_timed": batches,
                     "statistic": "median img/s, engine only (uint8 in, uint8 masks out)"},
        "target": {"what": "compiled FP16, width 64, batch 8, H200", "img_s": TARGET,
                   "reached": bool(w64_compiled and w64_compiled[0]["b8_img_s"] >= TARGET)},
        "models": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    slug = "".join(c if c.isalnum() else "_" for c in gpu.lower()).strip("_")
    path = args.out / f"gpu_engines_{slug}_{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{gpu}, torch {torch.__version__}, triton {report['versions']['triton']}, CUDA {torch.version.cuda}")
    print(f"{'model':<5} {'variant':<26} " + " ".join(f"{f'b{b} img/s':>9}" for b in batches) + "  notes")
    for model in results:
        for row in model["rows"]:
            notes = ""
            if "cold_build_s" in row:
                notes = (f"built for batch {row['compiled_batch_sizes']}: cold build {row['cold_build_s']} s, "
                         f"warm load {row['warm_load_s']} s "
                         f"(process {row['warm_load_process_s']} s), {row['ptc_mb']} MB, "
                         f"agreement {row['mask_agreement_vs_fp16_eager']}")
            rates = " ".join(f"{row.get(f'b{b}_img_s', float('nan')):>9.1f}" for b in batches)
            print(f"{model['model']:<5} {row['variant']:<26} {rates}  {notes}")
    print(f"target {TARGET:.0f} img/s (w64, b8): {'reached' if report['target']['reached'] else 'NOT reached'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-build":
        print(json.dumps(child_build(sys.argv[2], sys.argv[3], sys.argv[4])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-load":
        print(json.dumps(child_load(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])))
    else:
        sys.exit(main())
