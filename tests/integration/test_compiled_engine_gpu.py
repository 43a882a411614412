"""The compiled torch engine (.ptc) on a CUDA device: build, warm load, CUDA graphs and masks against eager
(marked gpu, skipped without one). File format, refusals and BatchNorm folding: tests/unit/test_compiled_engine.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.base import infer
from engines.compiled_engine import CompiledTorchEngine
from engines.loader import load_engine
from tests.conftest import tiny_checkpoint
from tests.unit.test_compiled_engine import SIZE, _model
from toolchain.compile import build_compiled
from toolchain.synth import generate

# -- on a CUDA device ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_engine_builds_loads_and_matches_eager(tmp_path: Path) -> None:
    from engines.torch_engine import TorchEngine

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", SIZE, 4, _model())
    out = build_compiled(ckpt, tmp_path / "tiny.ptc", batch_sizes=(4,))
    images = np.stack([img for img, _ in generate(4, SIZE, seed=5)])
    with CompiledTorchEngine(out, cuda_graphs=False) as launched:
        direct = [infer(launched, images[:n]) for n in (1, 3, 4)]
        assert not launched.uses_cuda_graphs
    with CompiledTorchEngine(out) as engine:
        assert engine.uses_cuda_graphs and engine.name.endswith("+graphs")
        # the per-slot CUDA graphs give exactly the masks of the kernels launched one by one
        for expected, n in zip(direct, (1, 3, 4), strict=True):
            assert np.array_equal(infer(engine, images[:n]), expected)
        assert engine.spec.precision == "fp16" and engine.spec.max_batch == 4
        assert engine.load_timings["compile_warm_s"] > 0
        with TorchEngine(ckpt, device="cuda", precision="fp16") as eager16, TorchEngine(ckpt) as cpu32:
            for n in (1, 3, 4):  # 1 and 3 run padded to 4
                got = infer(engine, images[:n])
                assert got.shape == (n, SIZE, SIZE)
                assert float((got == infer(eager16, images[:n])).mean()) >= 0.99
                assert float((got == infer(cpu32, images[:n])).mean()) >= 0.98
        # three batches in flight on two slots: each returns its own masks
        alone = [infer(engine, images[i : i + 2]) for i in range(3)]
        flights = [engine.submit(images[i : i + 2]) for i in range(3)]
        for expected, flight in zip(alone, flights, strict=True):
            assert np.array_equal(flight.result(), expected)
    with load_engine(out, device="cuda") as loaded:
        assert isinstance(loaded, CompiledTorchEngine)
