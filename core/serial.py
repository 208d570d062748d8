"""Tensor work for helper threads (adapter loads) that never starts an OpenMP team beside the engine's.

torch runs an op on several threads when it covers more than its grain (32,768 elements); the first such op
on a thread gives that thread an OpenMP team for as long as it lives. On 2 cores a second team beside the
engine thread's makes libgomp stop spin-waiting, and every parallel op of the engine pays a wake-up: an
adapter loader doing ``isfinite(buffer).all()`` over a whole adapter's buffer made 8-row decode steps 2.1-2.5x
slower while it ran (bench.scale's loads). These helpers split the work into pieces under the grain, which
torch runs inline on the calling thread. Costs a few µs per piece (about 40 pieces per MB of fp32).
"""

from __future__ import annotations

from typing import Final

import torch
from torch import Tensor

GRAIN: Final = 32_768  # at::internal::GRAIN_SIZE: larger ops may run on an OpenMP team


def copy_serial(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)`` (same shape; any strides), in pieces of at most GRAIN elements."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_serial: shapes differ, {tuple(dst.shape)} vs {tuple(src.shape)}")
    if dst.dim() == 0 or dst.numel() <= GRAIN:
        return dst.copy_(src)
    rows = max(1, GRAIN // max(1, dst[0].numel()))  # slices along dim 0 are views of both, whatever the strides
    for start in range(0, dst.shape[0], rows):
        if rows == 1:  # one row is over the grain itself: split it along its own first dimension
            copy_serial(dst[start], src[start])
        else:
            dst[start : start + rows].copy_(src[start : start + rows])
    return dst


def all_finite_serial(t: Tensor) -> bool:
    """No NaN or infinity in ``t``: its min and max are finite (NaN propagates through both), piece by piece.
    A non-contiguous ``t`` is copied whole first (the loader's buffers and parameters are contiguous)."""
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    if not flat.is_floating_point():
        return True
    for start in range(0, flat.numel(), GRAIN):
        low, high = torch.aminmax(flat[start : start + GRAIN])
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            return False
    return True
