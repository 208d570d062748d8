"""What a route is: how one wrapped module computes its output for the rows of a routing plan."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loramux.core.native import NativeLora


class Route:
    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The module's output for x; args/kwargs are the extra arguments of the base module's call."""
        raise NotImplementedError

    def adds_into(self, x: Tensor) -> bool:
        """Whether ``add_into`` takes this input: a decode step's x (N, 1, in), no autograd. A linear route
        that does says so; the decode step then adds its delta into a column slice of a fused GEMM's output
        instead of calling the module (decode_step.py). Default: no."""
        return False

    def add_into(self, x: Tensor, out: Tensor) -> None:
        """In place: out (N, out_features), the base output for x (N, 1, in) or a column slice of one (unit
        column stride, any row stride), += this route's delta, bit for bit what ``forward`` adds. Only for an
        x that ``adds_into`` took."""
        raise NotImplementedError

    def native_lora(self, rows: int) -> NativeLora | None:
        """The native call that adds this route's delta for ``rows`` rows, as ``add_into`` does (to fp32
        rounding), for the native decode layers to make inside their own call; None: none (they call
        ``add_into``). Only for an x that ``adds_into`` took. Default: none."""
        return None

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> None:
        """In place: row dst takes row src's routing for each (dst, src) in moves, then keep the first
        ``rows`` rows. Routes without per-row state need nothing."""

    def release(self) -> None:
        """The plan holding this route is dropped; routes that lease buffers give them back. Default: nothing."""


def decode_input(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether x is a decode step's input (N, 1, in) in ``dtype`` outside autograd: what ``add_into`` takes."""
    return x.dim() == 3 and x.shape[1] == 1 and x.dtype is dtype and not torch.is_grad_enabled()


def add_delta(out: Tensor, delta: Tensor) -> Tensor:
    """PEFT: the delta is computed in the LoRA dtype, added (promoted), then cast once to the base dtype."""
    return (out + delta).to(out.dtype)


def move_rows(t: Tensor, moves: Sequence[tuple[int, int]], rows: int) -> Tensor:
    """t (N, ...): copy rows src -> dst (src >= rows > dst, so no overlap), keep the first rows (a view). One
    plain copy per moved row: an indexed assignment cost 0.23 ms per module at a move or two (bench-scale's
    rows leave a few at a time), 15x the copies."""
    if moves:
        with torch.no_grad():
            for dst, src in moves:
                t[dst].copy_(t[src])
    return t[:rows]
