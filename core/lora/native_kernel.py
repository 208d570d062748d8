"""The native grouped-LoRA kernel (native/grouped_lora.c): built with the machine's C compiler at engine start.

torch's grouped route (grouped.py) runs five ops a module (gather the rows per adapter, two bmm, drop the
padding, add back) and its bmm streams the adapters at about half the rate a plain sum reads memory (BENCHMARKS
"Session 18"). The C kernel does the whole ``out[row] += x[row] · A_k · B_k`` of one module in one call, reading
each adapter's A and B once for all its rows, with the accumulators in registers.

It is built and loaded by ``loramux.core.native`` (compiled once per machine into a per-user cache, loaded
after torch so that its OpenMP binds to torch's libgomp: one thread pool for both). A self-check against torch
on a small case runs before the kernel is used. No compiler, a failed build or a failed check:
``load_grouped_kernel`` says why and the engine runs torch's route (``--lora-kernel auto``) or refuses to start
(``--lora-kernel native``).
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from torch import Tensor

from loramux.core.lora.weights import LinearLora
from loramux.core.native import NativeKernelUnavailable, NativeLora, load_library

SOURCE: Final = Path(__file__).with_name("native") / "grouped_lora.c"
MAX_RANK: Final = 64  # ranks 8, 16, 32, 64 run compiled for their rank; others up to 64 a generic loop

_P = ctypes.c_void_p
_I = ctypes.c_int64


def takes(lora: LinearLora) -> bool:
    """Whether the kernel can read this module's LoRA where it lies: fp32 on CPU, contiguous, rank <= MAX_RANK,
    no LoRA bias."""
    a, b = lora.At, lora.Bt
    return (
        lora.bias is None
        and lora.rank <= MAX_RANK
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in (a, b))
    )


@dataclass(frozen=True)
class Segments:
    """A batch's rows grouped by adapter, as the kernel reads them: segment k is rows[offsets[k]:offsets[k+1]]
    on adapter k, its A and B by address (so the tensors themselves are held here while the kernel may read
    them, whatever happens to the LinearLora objects)."""

    weights: tuple[Tensor, ...]  # every At and Bt the addresses point into
    rows: Tensor  # (V,) int64
    offsets: Tensor  # (K + 1,) int64
    a_ptrs: Tensor  # (K,) int64: each At's address
    b_ptrs: Tensor  # (K,) int64
    ranks: Tensor  # (K,) int64
    scales: Tensor  # (K,) fp32
    scratch: Tensor  # (V, r_max) fp32: x . A per row

    @classmethod
    def of(cls, loras: Sequence[LinearLora], members: Sequence[Sequence[int]]) -> Segments:
        """loras[k] (each ``takes``) serves rows members[k] (at least one each)."""
        r_max = max(lo.rank for lo in loras)
        return cls(
            weights=tuple(t for lo in loras for t in (lo.At, lo.Bt)),
            rows=torch.tensor([row for m in members for row in m], dtype=torch.int64),
            offsets=torch.tensor([0, *itertools.accumulate(len(m) for m in members)], dtype=torch.int64),
            a_ptrs=torch.tensor([lo.At.data_ptr() for lo in loras], dtype=torch.int64),
            b_ptrs=torch.tensor([lo.Bt.data_ptr() for lo in loras], dtype=torch.int64),
            ranks=torch.tensor([lo.rank for lo in loras], dtype=torch.int64),
            scales=torch.tensor([lo.scaling for lo in loras], dtype=torch.float32),
            scratch=torch.empty(sum(len(m) for m in members), r_max),
        )


@dataclass(frozen=True)
class GroupedKernel:
    """The loaded kernel. ``add`` is the one call a module's decode step makes."""

    path: Path
    _fn: ctypes._CFuncPtr  # type: ignore[name-defined]

    def add(self, out: Tensor, x: Tensor, segments: Segments) -> None:
        """In place: out[row] += (x[row] · At_k · Bt_k) * scaling_k for each row of each segment. out (N, out)
        and x (N, in) fp32 with unit column stride (the route checks; nothing here does)."""
        threads = torch.get_num_threads()
        status = self._fn(
            out.data_ptr(),
            out.stride(0),
            x.data_ptr(),
            x.stride(0),
            segments.a_ptrs.data_ptr(),
            segments.b_ptrs.data_ptr(),
            segments.ranks.data_ptr(),
            segments.scales.data_ptr(),
            segments.rows.data_ptr(),
            segments.offsets.data_ptr(),
            segments.a_ptrs.shape[0],
            x.shape[1],
            out.shape[1],
            segments.scratch.data_ptr(),
            segments.scratch.shape[1],
            threads,
        )
        if status != 0:
            raise ValueError(f"native grouped LoRA kernel: ranks {segments.ranks.tolist()} not within 1..{MAX_RANK}")

    def native_lora(self, segments: Segments | None) -> NativeLora:
        """``add``'s call for segments as a native caller makes it (native_layers.py): valid while segments
        lives (the caller holds it). None: no segments, a call that adds nothing."""
        if segments is None:
            return NativeLora(ctypes.cast(self._fn, ctypes.c_void_p).value)  # adapters 0
        return NativeLora(
            ctypes.cast(self._fn, ctypes.c_void_p).value,
            *(t.data_ptr() for t in (segments.a_ptrs, segments.b_ptrs, segments.ranks, segments.scales)),
            segments.rows.data_ptr(),
            segments.offsets.data_ptr(),
            segments.a_ptrs.shape[0],
            segments.scratch.data_ptr(),
            segments.scratch.shape[1],
        )


def load_grouped_kernel(*, cache_dir: Path | None = None) -> GroupedKernel:
    """Build (or reuse) and load the kernel, and check it against torch; NativeKernelUnavailable says why not."""
    lib, path = load_library(SOURCE, cache_dir=cache_dir)
    fn = lib.lora_grouped_add
    fn.restype = ctypes.c_int
    fn.argtypes = [_P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _I, ctypes.c_int]
    kernel = GroupedKernel(path=path, _fn=fn)
    _self_check(kernel)
    return kernel


def _self_check(kernel: GroupedKernel) -> None:
    """Each compiled rank and the generic one, segments of 1 to 13 rows (every row-block width), both schedules,
    a column tail and rows out of order, against torch in float64."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out = 30, 40, 2 * 64 + 24
    # five short segments (each thread takes whole adapters), then two long ones (the phases split across them)
    for ranks, sizes in [
        ((8, 16, 32, 64, 5), [1, 2, 3, 4, 5]),
        ((3, 64, 16, 8, 1), [1, 2, 3, 4, 5]),
        ((16, 7), [13, 9]),
    ]:
        loras = [random_lora(d_in, d_out, r, gen) for r in ranks]
        x = torch.randn(n, d_in, generator=gen)
        out = torch.randn(n, d_out, generator=gen)
        rows = torch.randperm(n, generator=gen)[: sum(sizes)].tolist()
        members = [rows[sum(sizes[:k]) : sum(sizes[: k + 1])] for k in range(len(sizes))]
        expected = out.double()
        for lo, seg in zip(loras, members, strict=True):
            expected[seg] += x[seg].double() @ lo.At.double() @ lo.Bt.double() * lo.scaling
        kernel.add(out, x, Segments.of(loras, members))
        error = (out.double() - expected).abs().max().item()
        if not error <= 1e-4 * max(1.0, expected.abs().max().item()):
            raise NativeKernelUnavailable(f"{kernel.path} failed its self-check at ranks {ranks} (error {error:.3g})")


def random_lora(d_in: int, d_out: int, rank: int, gen: torch.Generator, *, scale: float = 1.0) -> LinearLora:
    """A LinearLora of normal weights times ``scale`` (scaling 0.5): the self-check's and auto's timing cells."""
    at = torch.randn(d_in, rank, generator=gen) * scale  # (in, r)
    bt = torch.randn(rank, d_out, generator=gen) * scale  # (r, out)
    return LinearLora(at, bt, None, 0.5)
