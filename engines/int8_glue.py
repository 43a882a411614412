"""The INT8 engine's memory-bound steps between cuDNN graphs: pooling with the skip copy, and the upconv scatter.

Two implementations of the same integer arithmetic, bit for bit:

- `TorchGlue`: torch tensor ops (any device; on the CPU it checks the engine's code around the graphs).
- `TritonGlue` (the default on CUDA where triton is installed; SEGQ_INT8_GLUE=torch opts out): one Triton
  kernel per step. The torch ops make
  several passes over a level's activations (a 2x2 max as a strided reduction, a requantization through
  an int32 index tensor, the skip read a second time for the concat); each kernel here reads its input
  once and writes each output once.

Tensors are NHWC int8 (`(N, H, W, C)`), channels contiguous; outputs may be channel slices of a wider
concat buffer. `table` (int8, (256,)) requantizes: entry b is the output for the int8 value whose bit
pattern is b (engines.cudnn_int8.requantize_table); None copies unchanged.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch


class Glue(Protocol):
    """The steps a PlanRunner runs between its cuDNN graphs."""

    name: str

    def pool_and_copy(self, x: torch.Tensor, pooled: torch.Tensor, skip: torch.Tensor | None,
                      table: torch.Tensor | None) -> None:
        """pooled (N, H/2, W/2, C) = 2x2 max of x (N, H, W, C); skip (N, H, W, C), if given, = table[x] (or x)."""

    def scatter_upconv(self, gemm: torch.Tensor, out: torch.Tensor) -> None:
        """out[n, 2i + a, 2j + b, c] = gemm[n, i, j, (2a + b) * C + c]; gemm (N, h, w, 4C), out (N, 2h, 2w, C)."""


def as_words(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same int8 tensors viewed with the widest integer type (8, 4 or 2 bytes) all of them allow.

    A strided int8 copy moves one byte per element; viewing the contiguous channel run as int64
    moves eight. Needs the last dim contiguous and every stride and offset divisible; else int8.
    """
    for dtype in (torch.int64, torch.int32, torch.int16):
        try:
            return tuple(t.view(dtype) for t in tensors)
        except RuntimeError:
            continue
    return tensors


def copy_requantized(x: torch.Tensor, out: torch.Tensor, table: torch.Tensor | None) -> None:
    """out = table[x] (or x), with torch ops; out may be a channel slice."""
    if table is not None:
        x = table[x.view(torch.uint8).to(torch.int32)]
    wide_out, wide_x = as_words(out, x)
    wide_out.copy_(wide_x)


class TorchGlue:
    """The glue steps as torch tensor ops, on any device."""

    name = "torch"

    def pool_and_copy(self, x: torch.Tensor, pooled: torch.Tensor, skip: torch.Tensor | None,
                      table: torch.Tensor | None) -> None:
        """See Glue.pool_and_copy."""
        torch.amax(x.unflatten(1, (-1, 2)).unflatten(3, (-1, 2)), dim=(2, 4), out=pooled)
        if skip is not None:
            copy_requantized(x, skip, table)

    def scatter_upconv(self, gemm: torch.Tensor, out: torch.Tensor) -> None:
        """See Glue.scatter_upconv."""
        c = out.shape[-1]
        target, source = as_words(out.unflatten(1, (-1, 2)).unflatten(3, (-1, 2)),
                                  gemm.unflatten(3, (2, 2, c)).permute(0, 1, 3, 2, 4, 5))
        target.copy_(source)


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    if t.stride(3) != 1:
        raise ValueError(f"glue tensors need contiguous channels, got strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


def _block_channels(channels: int) -> int:
    """Channels per program: a power of two up to 64 that divides the channel count (else 16, masked)."""
    for block in (64, 32, 16):
        if channels % block == 0:
            return block
    return 16


class TritonGlue:
    """The glue steps as Triton kernels on CUDA (bit-identical to TorchGlue)."""

    name = "triton"
    PIXELS_PER_PROGRAM = 64

    def __init__(self) -> None:
        self._kernels = triton_kernels()

    def pool_and_copy(self, x: torch.Tensor, pooled: torch.Tensor, skip: torch.Tensor | None,
                      table: torch.Tensor | None) -> None:
        """See Glue.pool_and_copy."""
        n, h, w, c = x.shape
        block_c = _block_channels(c)
        pixels = n * (h // 2) * (w // 2)
        grid = (-(-pixels // self.PIXELS_PER_PROGRAM), -(-c // block_c))
        target = skip if skip is not None else x  # unused when HAS_SKIP is false
        self._kernels["pool"][grid](
            x, pooled, target, table if table is not None else x, pixels, h // 2, w // 2, c,
            *_pixel_strides(x), *_pixel_strides(pooled), *_pixel_strides(target),
            HAS_SKIP=skip is not None, HAS_TABLE=table is not None,
            BLOCK_P=self.PIXELS_PER_PROGRAM, BLOCK_C=block_c)

    def scatter_upconv(self, gemm: torch.Tensor, out: torch.Tensor) -> None:
        """See Glue.scatter_upconv."""
        n, h, w, four_c = gemm.shape
        c = four_c // 4
        block_c = _block_channels(c)
        pixels = n * h * w
        grid = (-(-pixels // self.PIXELS_PER_PROGRAM), -(-c // block_c))
        self._kernels["scatter"][grid](
            gemm, out, pixels, h, w, c, *_pixel_strides(gemm), *_pixel_strides(out),
            BLOCK_P=self.PIXELS_PER_PROGRAM, BLOCK_C=block_c)


def interpreter_unsafe() -> str:
    """Why Triton's interpreter must not run in this process ('' if it may): on a CUDA host the kernels are
    checked compiled (tests/integration/test_int8_glue_compiled.py), never interpreted beside that."""
    return "a CUDA device is present: the kernels are checked compiled here" if torch.cuda.is_available() else ""


def triton_unavailable() -> str:
    """Why TritonGlue cannot run here ('' if it can)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return ""


def select_glue(device: torch.device, choice: str = "auto") -> Glue:
    """The glue for `device`: choice "torch", "triton", or "auto".

    "auto" is the environment variable SEGQ_INT8_GLUE if set, else "triton" on a CUDA device where triton
    is installed (bit-identical to the torch ops and faster on the GPU: docs/int8-gpu.md), else "torch".
    ValueError on an unknown choice or Triton asked for where it cannot run.
    """
    if choice == "auto":
        default = "triton" if device.type == "cuda" and not triton_unavailable() else "torch"
        choice = os.environ.get("SEGQ_INT8_GLUE", default)
    if choice == "torch":
        return TorchGlue()
    if choice == "triton":
        reason = triton_unavailable()
        if reason:
            raise ValueError(f"INT8 glue 'triton' asked for, but {reason}")
        return TritonGlue()
    raise ValueError(f"unknown INT8 glue {choice!r}: expected auto, torch or triton")


_KERNELS: dict[str, dict[str, Any]] = {}


def triton_kernels() -> dict[str, Any]:
    """The Triton kernels, defined on first use (importing triton is slow and CUDA-only in production).

    Defined once per value of TRITON_INTERPRET (set: Triton's interpreter runs them, on CPU tensors)."""
    mode = os.environ.get("TRITON_INTERPRET", "")
    if mode in _KERNELS:
        return _KERNELS[mode]
    import triton
    import triton.language as tl

    @triton.jit
    def pool_kernel(x, pooled, skip, table, pixels, h2, w2, c,
                    sxn, sxh, sxw, spn, sph, spw, ssn, ssh, ssw,
                    HAS_SKIP: tl.constexpr, HAS_TABLE: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        j = p % w2
        i = (p // w2) % h2
        b = p // w2 // h2
        mask = (p < pixels)[:, None] & (ch < c)[None, :]
        best = tl.full((BLOCK_P, BLOCK_C), -128, tl.int8)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                y, xx = 2 * i + dy, 2 * j + dx
                v = tl.load(x + (b * sxn + y * sxh + xx * sxw)[:, None] + ch[None, :], mask=mask)
                best = tl.maximum(best, v)
                if HAS_SKIP:
                    if HAS_TABLE:
                        v = tl.load(table + v.to(tl.uint8, bitcast=True).to(tl.int32), mask=mask)
                    tl.store(skip + (b * ssn + y * ssh + xx * ssw)[:, None] + ch[None, :], v, mask=mask)
        tl.store(pooled + (b * spn + i * sph + j * spw)[:, None] + ch[None, :], best, mask=mask)

    @triton.jit
    def scatter_kernel(gemm, out, pixels, h, w, c, sgn, sgh, sgw, son, soh, sow,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        j = p % w
        i = (p // w) % h
        b = p // w // h
        mask = (p < pixels)[:, None] & (ch < c)[None, :]
        source = (b * sgn + i * sgh + j * sgw)[:, None] + ch[None, :]
        for a in tl.static_range(2):
            for bb in tl.static_range(2):
                v = tl.load(gemm + source + (2 * a + bb) * c, mask=mask)
                target = (b * son + (2 * i + a) * soh + (2 * j + bb) * sow)[:, None] + ch[None, :]
                tl.store(out + target, v, mask=mask)

    _KERNELS[mode] = {"pool": pool_kernel, "scatter": scatter_kernel}
    return _KERNELS[mode]
