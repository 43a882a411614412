"""The INT8 engine's Triton glue kernels compiled: for Hopper on any machine (Triton's bundled ptxas, no GPU),
and run on a CUDA device (marked `gpu`) against the torch ops, with tests/unit/test_int8_glue.py's checks
(which run them in Triton's interpreter; compiling starts ptxas, which the unit tier forbids)."""

from __future__ import annotations

import pytest
import torch

from engines.int8_glue import triton_unavailable
from tests.unit.test_int8_glue import (
    RATIOS,
    SHAPES,
    check_pool_and_copy,
    check_pool_without_skip,
    check_scatter,
)

pytestmark = pytest.mark.skipif(bool(triton_unavailable()), reason=triton_unavailable() or "ok")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_kernels_compile_for_hopper_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every specialization the engine launches compiles to an sm_90 cubin (Triton's own ptxas, no GPU needed):
    a kernel that only the interpreter accepts fails here, in CI."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engines.int8_glue import triton_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = triton_kernels()
    target = GPUTarget("cuda", 90, 32)
    pointers = {"x": "*i8", "pooled": "*i8", "skip": "*i8", "table": "*i8"}
    ints = ["pixels", "h2", "w2", "c", "sxn", "sxh", "sxw", "spn", "sph", "spw", "ssn", "ssh", "ssw"]
    flags = ["HAS_SKIP", "HAS_TABLE", "BLOCK_P", "BLOCK_C"]
    signature = pointers | dict.fromkeys(ints, "i32") | dict.fromkeys(flags, "constexpr")
    for has_skip in (False, True):
        for has_table in (False, True):
            source = ASTSource(kernels["pool"], signature, {"HAS_SKIP": has_skip, "HAS_TABLE": has_table, "BLOCK_P": 64,
                                                                         "BLOCK_C": 64})
            assert triton.compile(source, target=target).asm["cubin"]
    ints = ["pixels", "h", "w", "c", "sgn", "sgh", "sgw", "son", "soh", "sow"]
    source = ASTSource(kernels["scatter"], {"gemm": "*i8", "out": "*i8"} | dict.fromkeys(ints, "i32")
                       | dict.fromkeys(["BLOCK_P", "BLOCK_C"], "constexpr"), constexprs={"BLOCK_P": 64, "BLOCK_C": 64})
    assert triton.compile(source, target=target).asm["cubin"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [*SHAPES, (8, 512, 512, 64, 128, 0)])  # the last: a width-64 U-Net's top level
@pytest.mark.parametrize("ratio", RATIOS)
def test_compiled_pool_and_skip_copy_match_the_torch_ops(shape: tuple[int, ...], ratio: float | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_pool_and_copy(torch.device("cuda"), shape, ratio)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [*SHAPES, (8, 256, 256, 64, 128, 64)])
def test_compiled_upconv_scatter_matches_the_torch_ops(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_scatter(torch.device("cuda"), shape)


@pytest.mark.gpu
@gpu
def test_compiled_pool_without_skip_writes_only_the_pooled_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_pool_without_skip(torch.device("cuda"))
