"""Build a compiled torch engine (`.ptc`) from a checkpoint, on the GPU that will run it.

Load the checkpoint, prepare it as `engines.compiled_engine` runs it (BatchNorm folded, FP16,
channels_last, uint8 in and masks out), compile and run every batch size in `batch_sizes` twice,
then `torch.compiler.save_cache_artifacts()` -> bytes stored in the file. One compiled batch size
(the spec's max batch) is the default: a worker under load runs full batches. The measured cost
of more sizes is in benchmarks/results/gpu_engines_*.json (benchmarks/gpu_engines.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from engines.base import EngineError
from engines.checkpoint import load_checkpoint
from engines.compiled_engine import COMPILE_MODE, FORMAT, SUFFIX, compile_module, current_setup, prepare_module
from engines.cuda_slots import cuda_device
from engines.versions import built_with


def fresh_artifacts():
    """A context in which torch records only this build's cache artifacts (private API; optional)."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        return CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def build_compiled(
    checkpoint_path: Path,
    out_path: Path,
    device: str = "cuda",
    precision: str = "fp16",
    batch_sizes: tuple[int, ...] | None = None,
) -> Path:
    """Compile a checkpoint for this GPU and write the `.ptc` engine; returns out_path.

    precision: "fp16" only. batch_sizes: static batch sizes to compile (default: the spec's
    max_batch); smaller batches run padded. Each size costs its own max-autotune compile, at build
    and again (from the cache) at load; more sizes trade build time, load time and file size for
    small-batch latency. Raises EngineError without CUDA, for other precisions or a non-.ptc name.
    """
    checkpoint_path, out = Path(checkpoint_path), Path(out_path)
    if precision != "fp16":
        raise EngineError(f"compiled engines are FP16 (half weights, channels_last); got precision {precision!r}")
    if out.suffix.lower() != SUFFIX:
        raise EngineError(f"{out}: a compiled engine file must end in {SUFFIX} (the loader recognizes it by that)")
    if not device.startswith("cuda"):
        raise EngineError(f"{checkpoint_path}: compiled engines are built and run on CUDA only, got device {device!r}")
    dev = cuda_device(device, str(checkpoint_path))
    ckpt = load_checkpoint(checkpoint_path)
    sizes = tuple(sorted(set(batch_sizes or (ckpt.spec.max_batch,))))
    if sizes[0] < 1 or sizes[-1] > ckpt.spec.max_batch:
        raise EngineError(f"batch sizes {sizes} must lie in 1..{ckpt.spec.max_batch} (the checkpoint's max batch)")
    started = time.perf_counter()
    with fresh_artifacts():
        compile_module(prepare_module(ckpt, dev), sizes, ckpt.spec, dev)
        build_s = time.perf_counter() - started
        saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise EngineError(f"{checkpoint_path}: torch.compile produced no cache artifacts to save (caching disabled?)")
    blob = saved[0]
    record = built_with(
        str(dev), **current_setup(str(dev)), cuda=str(torch.version.cuda), source=checkpoint_path.name,
        compile_mode=COMPILE_MODE, batch_sizes=",".join(map(str, sizes)), build_s=f"{build_s:.1f}",
        compile_cache_mb=f"{len(blob) / 1e6:.1f}",
    )
    spec = replace(ckpt.spec, precision="fp16", min_batch=1, max_batch=sizes[-1], built_with=record)
    payload = {
        "format": FORMAT,
        "config": ckpt.config.to_dict(),
        "state_dict": ckpt.state_dict,
        "spec": asdict(spec),
        "compile": {"mode": COMPILE_MODE, "batch_sizes": list(sizes), "dynamic": False, "fold_batchnorm": True},
        "compile_cache": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
        "built_with": record,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    return out
