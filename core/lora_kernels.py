"""Which kernel applies per-row adapters in a decode step on CPU.

``torch``: ``GatheredLinear``'s bmm then ``baddbmm_`` (core/routing.py). ``native``: core/lora_decode.c, one
pass over each row's A and B, compiled when the engine starts on the machine that runs it (``cc -O3
-march=native -fopenmp``, into a temporary folder that is removed again) and loaded with ctypes. Compiling
here rather than shipping a binary means the kernel uses exactly this CPU's instructions and never one it
lacks; a process builds it once (about 0.3 s), for its first engine. Before it is used, the kernel is checked
against bmm on random inputs. Without a C compiler, or if compiling or the check fails, the engine logs why
and keeps ``torch``. The two agree to fp32 rounding.

The kernel handles the decode hot path only: one token per row, fp32, contiguous operands, no LoRA bias, no
autograd. Everything else (prefill, other dtypes, devices) stays on torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

import torch
from torch import Tensor

log = logging.getLogger(__name__)

NATIVE: Final = "native"
TORCH: Final = "torch"
LORA_KERNELS: Final = (NATIVE, TORCH)

_SOURCE = Path(__file__).with_name("lora_decode.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


class NativeLoraDecode:
    """out (N, 1, o) += (x (N, 1, i) @ At (N, i, r)) @ Bt (N, r, o), in place, through lora_decode.c."""

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))  # kept open for the life of this object
        fn = self._lib.loramux_lora_decode_f32
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        fn.restype = None
        self._fn = fn

    def apply(self, out: Tensor, x: Tensor, At: Tensor, Bt: Tensor) -> bool:
        """Add the rows' LoRA outputs into ``out``; False (nothing done) for anything but the decode hot path."""
        if not (
            x.dim() == 3
            and x.shape[1] == 1
            and out.shape == (*x.shape[:2], Bt.shape[2])
            and all(t.device.type == "cpu" and t.dtype is torch.float32 and t.is_contiguous() for t in (out, x, At, Bt))
            and not (out.requires_grad or x.requires_grad or At.requires_grad or Bt.requires_grad)
        ):
            return False
        rows, _, d_in = x.shape
        rank, d_out = Bt.shape[1], Bt.shape[2]
        # ctypes releases the GIL for the call; the C side reads only these pointers, for its duration
        self._fn(
            x.data_ptr(), At.data_ptr(), Bt.data_ptr(), out.data_ptr(), rows, d_in, rank, d_out, torch.get_num_threads()
        )
        return True


def load_lora_kernel(kind: str, *, compiler: str = "cc") -> NativeLoraDecode | None:
    """The kernel for ``kind`` (NATIVE or TORCH): a checked NativeLoraDecode, or None for torch ops (also when
    the native kernel cannot be built here; logged)."""
    if kind not in LORA_KERNELS:
        raise ValueError(f"lora kernel must be one of {', '.join(LORA_KERNELS)} (got {kind!r})")
    if kind == TORCH:
        return None
    kernel, problem = _built(compiler)
    if kernel is None:
        log.warning("native LoRA decode kernel unavailable (%s); using torch ops", problem)
    return kernel


@functools.cache  # once per process and compiler: every engine after the first reuses it
def _built(compiler: str) -> tuple[NativeLoraDecode | None, str]:
    try:
        kernel = _build(compiler)
        problem = _mismatch(kernel)
    except subprocess.CalledProcessError as exc:
        return None, f"{compiler} failed: {(exc.stderr or '').strip().splitlines()[-1:] or exc.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, str(exc) or type(exc).__name__
    return (None, problem) if problem else (kernel, "")


def _build(compiler: str) -> NativeLoraDecode:
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler {compiler!r} on PATH")
    with tempfile.TemporaryDirectory(prefix="loramux-kernel-") as folder:
        library = Path(folder) / "liblora_decode.so"
        subprocess.run(
            [compiler, *_FLAGS, "-o", str(library), str(_SOURCE)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return NativeLoraDecode(library)  # dlopen maps the file; removing the folder after is safe


def _mismatch(kernel: NativeLoraDecode) -> str:
    """'' when the kernel computes what bmm computes on random inputs (both rank paths), else what differs."""
    generator = torch.Generator().manual_seed(0)
    for rows, d_in, rank, d_out in ((3, 70, 16, 130), (2, 33, 5, 17)):
        x, At, Bt, out = (
            torch.randn(shape, generator=generator)
            for shape in ((rows, 1, d_in), (rows, d_in, rank), (rows, rank, d_out), (rows, 1, d_out))
        )
        want = torch.baddbmm(out, torch.bmm(x, At), Bt)
        if not kernel.apply(out, x, At, Bt):
            return "refused its own check inputs"
        if not torch.allclose(out, want, rtol=1e-4, atol=1e-4):
            return f"differs from bmm by {(out - want).abs().max().item():.3g} (rank {rank})"
    return ""
