"""The native linear kernel (native/skinny_linear.c): y = x · Wᵀ + b for the few rows of a decode step.

At 1-16 rows MKL's and oneDNN's GEMMs streamed the bench model's linear weights at 13-24 GB/s on an Intel Xeon
that sums memory at 30-40: their loads and FMAs took turns. The C kernel reads each weight row once for a
block of up to eight input rows and prefetches the rows ahead, and ran the model's 33 linears of a decode
step 1.5-1.6x faster than the faster of the two at 4-8 rows, 1.2x at 1 and 16 rows, even at 32 and behind
at 64 (BENCHMARKS "Session 22"). It needs AVX-512F; ``--linear-kernel auto`` times it beside the others on
this machine's shapes and row counts, and uses it only where it measured faster.

Built and loaded by ``loramux.core.native``; a self-check against float64 runs first. Each output is one sum in
a fixed order whatever the thread count, so results do not depend on the schedule; they agree with MKL's and
oneDNN's to fp32 rounding (the order differs).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from torch import Tensor

from loramux.core.native import NativeKernelUnavailable, load_library

SOURCE: Final = Path(__file__).with_name("native") / "skinny_linear.c"
MAX_ROWS: Final = 64  # beyond, the general GEMMs' blocking wins (timed slower at 64 already)

_P = ctypes.c_void_p
_I = ctypes.c_int64


@dataclass(frozen=True)
class NativeLinear:
    """The loaded kernel; ``takes`` says where it runs, calling it runs it."""

    path: Path
    _fn: ctypes._CFuncPtr  # type: ignore[name-defined]

    @staticmethod
    def takes(x: Tensor, weight: Tensor) -> bool:
        """Whether the kernel runs ``F.linear(x, weight, ...)``: fp32 on CPU, a contiguous weight, a few rows."""
        d_in = x.shape[-1] if x.dim() else 0
        return (
            x.dtype is torch.float32
            and weight.dtype is torch.float32
            and x.is_cpu
            and weight.is_cpu
            and weight.is_contiguous()
            and d_in == weight.shape[1]
            and 0 < x.numel() <= MAX_ROWS * d_in
        )

    # one loaded library per process, shared by every layer: copies are the same kernel, and a pickled layer
    # loads this machine's build where it is unpickled
    def __copy__(self) -> NativeLinear:
        return self

    def __deepcopy__(self, memo: dict) -> NativeLinear:
        return self

    def __reduce__(self) -> tuple:
        return (_loaded, ())

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear(x, weight, bias)`` for x (..., in) that ``takes`` accepts; (..., out)."""
        # a few microseconds of Python per call is a few percent of a decode step's 33 calls: kept lean
        shape = x.shape
        d_in, d_out = shape[-1], weight.shape[0]
        rows = x.numel() // d_in
        if x.is_contiguous():
            flat = x.view(rows, d_in)  # (N, in)
        else:
            flat = x.reshape(rows, d_in)  # a view wherever the rows are evenly spaced
            if flat.stride(-1) != 1 or (rows > 1 and flat.stride(0) < d_in):
                flat = flat.contiguous()
        if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        y = torch.empty(rows, d_out, dtype=torch.float32)  # (N, out)
        self._fn(
            flat.data_ptr(),
            rows,
            flat.stride(0),
            weight.data_ptr(),
            d_out,
            d_in,
            bias.data_ptr() if bias is not None else None,
            y.data_ptr(),
            d_out,
            torch.get_num_threads(),
        )
        return y if len(shape) == 2 else y.view(*shape[:-1], d_out)


def load_native_linear(*, cache_dir: Path | None = None) -> NativeLinear:
    """Build (or reuse) and load the kernel and check it; NativeKernelUnavailable says why it cannot run."""
    lib, path = load_library(SOURCE, cache_dir=cache_dir)
    fn = lib.skinny_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [_P, _I, _I, _P, _I, _I, _P, _P, _I, ctypes.c_int]
    kernel = NativeLinear(path=path, _fn=fn)
    _self_check(kernel)
    return kernel


@functools.cache
def native_linear() -> NativeLinear | str:
    """This process's kernel from the per-user cache, or why it cannot run (built and checked once)."""
    try:
        return load_native_linear()
    except NativeKernelUnavailable as exc:
        return str(exc)


def _loaded() -> NativeLinear:
    kernel = native_linear()
    if isinstance(kernel, str):
        raise NativeKernelUnavailable(kernel)
    return kernel


def _self_check(kernel: NativeLinear) -> None:
    """Rows 1 to 13 (every block width, a second block), an odd output count, an input width that is not a
    multiple of 16, with and without a bias, against float64."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 40, 2 * 64 + 23
    weight = torch.randn(d_out, d_in, generator=gen)
    bias = torch.randn(d_out, generator=gen)
    for rows in range(1, 14):
        x = torch.randn(rows, d_in, generator=gen)
        for b in (None, bias):
            want = x.double() @ weight.double().T + (b.double() if b is not None else 0.0)
            error = (kernel(x, weight, b).double() - want).abs().max().item()
            if not error <= 1e-4 * max(1.0, want.abs().max().item()):
                raise NativeKernelUnavailable(f"{kernel.path} failed its self-check at {rows} rows (error {error:.3g})")
