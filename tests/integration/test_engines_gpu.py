"""The CUDA torch engine against the CPU engine (skipped without a CUDA device).

On a GPU machine without pytest, `python -m toolchain.gpucheck` runs the same checks and a timing table.
"""

from __future__ import annotations

import pytest
import torch

import engines
from toolchain.gpucheck import check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_torch_engine_matches_cpu() -> None:
    assert check(engines.DEMO_CHECKPOINT) == []
