"""The INT8 engine's glue steps (engines.int8_glue): the Triton kernels give the torch ops' bytes exactly.

Here the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1: the same kernel code, each
program executed with numpy). Compiled, on a GPU, the same checks run from
tests/integration/test_int8_glue_compiled.py: compiling starts ptxas, which this tier forbids, and
the interpreter and compiled kernels never share a process (engines.int8_glue.interpreter_unsafe).
"""

from __future__ import annotations

import pytest
import torch

from engines.cudnn_int8 import requantize_table
from engines.int8_glue import TorchGlue, TritonGlue, interpreter_unsafe, select_glue, triton_unavailable

# (batch, height, width, channels, concat channels, channel offset in the concat buffer)
SHAPES = [(2, 16, 16, 16, 48, 16), (1, 8, 12, 32, 32, 0), (3, 4, 4, 24, 40, 8), (1, 2, 130, 64, 128, 64)]
RATIOS = [None, 0.37, 1.8]

needs_interpreter = pytest.mark.skipif(bool(triton_unavailable() or interpreter_unsafe()),
                                       reason=triton_unavailable() or interpreter_unsafe() or "ok")


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The CPU, with Triton's interpreter on (engines.int8_glue defines the kernels per mode)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def random_int8(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Uniform int8 over the whole range, every bit pattern present in large tensors."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g).to(device)


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """The 2x2 max of an NHWC tensor, on the CPU."""
    return x.cpu().unflatten(1, (-1, 2)).unflatten(3, (-1, 2)).amax(dim=(2, 4))


def check_pool_and_copy(device: torch.device, shape: tuple[int, ...], ratio: float | None) -> None:
    """TritonGlue.pool_and_copy writes what TorchGlue's does, and nothing outside the skip's slice."""
    n, h, w, c, total, offset = shape
    x = random_int8((n, h, w, c), seed=h * w + c, device=device)
    table = None if ratio is None else requantize_table(ratio, device)
    results = []
    for glue in (TorchGlue(), TritonGlue()):
        pooled = torch.full((n, h // 2, w // 2, c), 7, dtype=torch.int8, device=device)
        concat = torch.full((n, h, w, total), 7, dtype=torch.int8, device=device)
        glue.pool_and_copy(x, pooled, concat[..., offset:offset + c], table)
        results.append((pooled.cpu(), concat.cpu()))
    (pooled, concat), (t_pooled, t_concat) = results
    assert torch.equal(pooled, max_pool_2x2(x))
    assert torch.equal(t_pooled, pooled)
    assert torch.equal(t_concat, concat)  # the slice requantized, the rest of the buffer untouched (7)
    assert bool((t_concat[..., :offset] == 7).all()) and bool((t_concat[..., offset + c:] == 7).all())


def check_scatter(device: torch.device, shape: tuple[int, ...]) -> None:
    """TritonGlue.scatter_upconv writes what TorchGlue's does."""
    n, h, w, c, total, offset = shape
    gemm = random_int8((n, h, w, 4 * c), seed=c, device=device)
    results = []
    for glue in (TorchGlue(), TritonGlue()):
        concat = torch.full((n, 2 * h, 2 * w, total), 7, dtype=torch.int8, device=device)
        glue.scatter_upconv(gemm, concat[..., offset:offset + c])
        results.append(concat.cpu())
    expected = results[0]
    g = gemm.cpu()
    assert torch.equal(expected[0, 1, 2, offset:offset + c], g[0, 0, 1, 2 * c:3 * c])  # pixel (2*0+1, 2*1+0): a=1, b=0
    assert torch.equal(results[1], expected)


def check_pool_without_skip(device: torch.device) -> None:
    """Without a skip, only the pooled tensor is written."""
    x = random_int8((2, 8, 8, 16), seed=5, device=device)
    pooled = torch.zeros((2, 4, 4, 16), dtype=torch.int8, device=device)
    before = x.clone()
    TritonGlue().pool_and_copy(x, pooled, None, None)
    assert torch.equal(x, before)
    assert torch.equal(pooled.cpu(), max_pool_2x2(x))


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_pool_and_skip_copy_match_the_torch_ops(interpreted: torch.device, shape: tuple[int, ...],
                                                ratio: float | None) -> None:
    check_pool_and_copy(interpreted, shape, ratio)


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES)
def test_upconv_scatter_matches_the_torch_ops(interpreted: torch.device, shape: tuple[int, ...]) -> None:
    check_scatter(interpreted, shape)


@needs_interpreter
def test_pool_without_skip_writes_only_the_pooled_tensor(interpreted: torch.device) -> None:
    check_pool_without_skip(interpreted)


@pytest.mark.skipif(bool(triton_unavailable()), reason=triton_unavailable() or "ok")
def test_selection_names_what_runs_and_refuses_unknown_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGQ_INT8_GLUE", raising=False)
    assert select_glue(torch.device("cpu")).name == "torch"
    assert select_glue(torch.device("cuda")).name == "triton"  # the default on CUDA where triton is installed
    monkeypatch.setenv("SEGQ_INT8_GLUE", "torch")
    assert select_glue(torch.device("cuda")).name == "torch"
    monkeypatch.setenv("SEGQ_INT8_GLUE", "triton")
    assert select_glue(torch.device("cpu")).name == "triton"  # asked for by name: the caller's choice
    with pytest.raises(ValueError, match="unknown INT8 glue 'cuda'"):
        select_glue(torch.device("cpu"), "cuda")
