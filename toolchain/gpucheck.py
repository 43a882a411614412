"""Check and time the CUDA torch engine on a GPU machine: `python -m toolchain.gpucheck [CHECKPOINT]`.

Compares CUDA FP32, AMP and FP16 masks with the CPU engine's on synthetic 512-px images, checks that
slots reused before their results are read still return the right masks, and times engine-only
throughput at batch 8 for the given checkpoint and for a random-weight width-64 U-Net (the study's
size). Prints one table; exits 1 if a check fails.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.metrics import mean_dice
from engines import DEMO_CHECKPOINT
from engines.base import EngineSpec, infer
from engines.checkpoint import save_checkpoint
from engines.torch_engine import TorchEngine
from engines.unet import UNet, UNetConfig
from toolchain.bench import throughput
from toolchain.synth import generate


def check(checkpoint: Path, device: str = "cuda") -> list[str]:
    """Correctness checks of TorchEngine on `device` against the CPU engine; returns failures."""
    failures: list[str] = []
    pairs = list(generate(8, 512, seed=777))
    images = np.stack([p[0] for p in pairs])
    truth = np.stack([p[1] for p in pairs])
    with TorchEngine(checkpoint) as cpu:
        ref = infer(cpu, images)
    ref_dice = mean_dice(ref, truth)
    print(f"cpu fp32: Dice {ref_dice:.4f}")
    for precision, floor in (("fp32", 0.999), ("amp", 0.995), ("fp16", 0.995)):
        with TorchEngine(checkpoint, device=device, precision=precision) as gpu:
            masks = infer(gpu, images)
            agree = float((masks == ref).mean())
            d = mean_dice(masks, truth)
            print(f"{device} {precision}: agreement with cpu {agree:.5f}, Dice {d:.4f}")
            if agree < floor:
                failures.append(f"{precision}: agreement {agree:.5f} < {floor}")
            if abs(d - ref_dice) > 0.005:
                failures.append(f"{precision}: Dice {d:.4f} vs cpu {ref_dice:.4f}")
            # three batches of different images in flight on two slots: the first slot is reused
            # before its result() is read; each must still return its own masks (compared with the
            # same batch run alone: same batch size, same kernels)
            alone = [infer(gpu, images[i * 2 : i * 2 + 2]) for i in range(3)]
            flights = [gpu.submit(images[i * 2 : i * 2 + 2]) for i in range(3)]
            for i, flight in enumerate(flights):
                same = float((flight.result() == alone[i]).mean())
                if same < 0.9999:
                    failures.append(f"{precision}: batch {i} of 3 in flight: agreement {same:.5f} with it run alone")
    return failures


def timings(checkpoint: Path, device: str = "cuda", iters: int = 50) -> list[tuple[str, str, int, float]]:
    """(model, precision, batch, img/s) rows for the checkpoint and a random width-64 U-Net."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        w64 = save_checkpoint(Path(tmp) / "unet_w64.pt", UNet(UNetConfig(width=64)), EngineSpec())
        images = np.stack([img for img, _ in generate(8, 512, seed=1)])
        for label, path in (("w16 demo", checkpoint), ("w64 random", w64)):
            for precision in ("fp32", "amp", "fp16"):
                with TorchEngine(path, device=device, precision=precision) as engine:
                    for batch in (1, 8):
                        rate = throughput(engine, images[:batch], iters=iters, warmup=5)
                        rows.append((label, precision, batch, rate))
    return rows


def main(argv: list[str]) -> int:
    checkpoint = Path(argv[0]) if argv else DEMO_CHECKPOINT
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    failures = check(checkpoint)
    rows = timings(checkpoint)
    print(f"\n{'model':<12} {'precision':<9} {'batch':>5} {'img/s':>9}")
    for label, precision, batch, rate in rows:
        print(f"{label:<12} {precision:<9} {batch:>5} {rate:>9.1f}")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
