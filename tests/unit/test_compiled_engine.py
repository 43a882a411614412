"""The compiled torch engine (.ptc) on CPU without compiling: file format, refusals and BatchNorm folding.
Build, warm load and masks on a CUDA device: tests/integration/test_compiled_engine_gpu.py."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from engines.base import EngineError, EngineSpec
from engines.compiled_engine import (
    FORMAT,
    CompiledTorchEngine,
    check_compiled_setup,
    fold_batchnorm_modules,
    read_compiled,
    rebuild_hint,
)
from engines.loader import load_engine, read_spec
from engines.unet import UNet
from tests.conftest import tiny_checkpoint, tiny_unet
from toolchain.compile import build_compiled

SIZE = 64


def _model() -> UNet:
    return tiny_unet(bn_stats=True)


BUILT = {"torch": "2.11.0+cu130", "triton": "3.6.0", "gpu": "NVIDIA H200", "compute_capability": "9.0",
         "source": "unet_w64.pt"}


def _fake_ptc(path: Path, **built: str) -> Path:
    """A well-formed .ptc whose compile cache is not a real one (enough for everything before compiling)."""
    model = _model()
    spec = EngineSpec(height=SIZE, width=SIZE, max_batch=8, precision="fp16", built_with={**BUILT, **built})
    torch.save(
        {
            "format": FORMAT,
            "config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "spec": asdict(spec),
            "compile": {"mode": "max-autotune-no-cudagraphs", "batch_sizes": [8], "dynamic": False},
            "compile_cache": torch.frombuffer(bytearray(b"not a real cache"), dtype=torch.uint8),
            "built_with": {**BUILT, **built},
        },
        path,
    )
    return path


def test_ptc_file_reads_with_weights_only(tmp_path: Path) -> None:
    path = _fake_ptc(tmp_path / "unet.ptc")
    compiled = read_compiled(path)
    assert compiled.batch_sizes == (8,) and compiled.spec.precision == "fp16"
    assert compiled.compile_cache.numpy().tobytes() == b"not a real cache"
    assert compiled.checkpoint.build_model().config.width == 8
    assert read_spec(path).built_with["gpu"] == "NVIDIA H200"  # `engines info` works anywhere


def test_ptc_on_cpu_is_refused_clearly(tmp_path: Path) -> None:
    path = _fake_ptc(tmp_path / "unet.ptc")
    with pytest.raises(EngineError, match=r"unet.ptc: a compiled torch engine \(.ptc\) runs on CUDA only"):
        CompiledTorchEngine(path, device="cpu")
    with pytest.raises(EngineError, match="CUDA only"):
        load_engine(path)  # the loader's default device is cpu
    with pytest.raises(EngineError, match="fp16"):
        load_engine(path, device="cuda", precision="fp32")


def test_ptc_built_on_another_gpu_is_refused() -> None:
    here = {"torch": "2.11.0+cu130", "triton": "3.6.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    with pytest.raises(EngineError) as info:
        check_compiled_setup("out/unet.ptc", BUILT, here)
    message = str(info.value)
    assert "gpu 'NVIDIA H200' (here: 'NVIDIA H100 80GB HBM3')" in message
    assert "`engines build unet_w64.pt --precision fp16 --compile -o unet.ptc`" in message
    with pytest.raises(EngineError, match=r"torch '2.11.0\+cu130' \(here: '2.13.0'\)"):
        check_compiled_setup("unet.ptc", BUILT, {**here, "gpu": "NVIDIA H200", "torch": "2.13.0"})
    check_compiled_setup("unet.ptc", BUILT, {**here, "gpu": "NVIDIA H200"})
    assert "--compile" in rebuild_hint("x.ptc", {})


def test_malformed_ptc_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.ptc"
    torch.save({"format": FORMAT, "spec": {}}, path)
    with pytest.raises(EngineError, match="malformed compiled engine"):
        read_compiled(path)
    torch.save({"format": "something/else"}, path)
    with pytest.raises(EngineError, match="not a segqueue-compiled/1 file"):
        read_compiled(path)


def test_build_compiled_refusals(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", SIZE, 8, _model())
    with pytest.raises(EngineError, match="CUDA only"):
        build_compiled(ckpt, tmp_path / "tiny.ptc", device="cpu")
    with pytest.raises(EngineError, match="FP16"):
        build_compiled(ckpt, tmp_path / "tiny.ptc", precision="fp32")
    with pytest.raises(EngineError, match=r"must end in \.ptc"):
        build_compiled(ckpt, tmp_path / "tiny.pt2")


def test_fold_batchnorm_keeps_the_logits() -> None:
    model = _model()
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.inference_mode():
        before = model(x)
        folded = fold_batchnorm_modules(model)
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


# -- on a CUDA device ----------------------------------------------------------------------------
