"""The INT8 engine's Triton glue kernels compile for Hopper on a machine without a GPU (Triton's bundled ptxas
runs as a subprocess, hence here and not in tests/unit/test_int8_glue.py, which checks what they compute)."""

from __future__ import annotations

import pytest

from engines.int8_glue import triton_unavailable

pytestmark = pytest.mark.skipif(bool(triton_unavailable()), reason=triton_unavailable() or "ok")


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
