"""``--lora-kernel``: which code adds a decode step's grouped LoRA deltas, torch's ops or the native kernel.

The native kernel (native_kernel.py) ran 64 rows over 8 adapters' decode step in 38.7 ms where torch's grouped
route took 42.5 (35.6 without adapters; Intel Xeon with AMX, BENCHMARKS "Native grouped LoRA"), but a kernel
tuned on one CPU has lost on another before (issue #13). So ``auto`` builds it at engine start and times it
against torch's grouped route on the model's own linear shapes: rank 16, a small and the largest batch with
rows sharing a few adapters, each cell cycling through enough copies of the adapters to read them from memory,
as a step does. It keeps the native kernel only if it was faster over all the cells, and logs them. ``native``
requires the kernel (a start error says why it cannot build); ``torch`` never builds it. Either way the
deltas agree to fp32 rounding: the choice changes speed only. Where the kernel is kept, decode plans send rows
on distinct adapters to it too (grouped.prefers_grouped); the cells time shared adapters only, as the gain
for distinct ones is the decode step's fused GEMMs, not the route alone (BENCHMARKS "Session 23").
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import torch
from torch import Tensor, nn

from loramux.core.lora.grouped import GroupedLinear
from loramux.core.lora.native_kernel import GroupedKernel, NativeKernelUnavailable, load_grouped_kernel, random_lora
from loramux.core.lora.route import Route
from loramux.core.lora.weights import LinearLora

log = logging.getLogger(__name__)

RANK: Final = 16
STREAM_BYTES: Final = 32 * 2**20  # each cell cycles through copies of the stacks adding up to this (past L2)
MAX_COPIES: Final = 64
MIN_RUNS: Final = 3
MAX_RUNS: Final = 20
CELL_SECONDS: Final = 0.01


class LoraKernel(enum.Enum):
    """What adds the grouped route's deltas in a decode step (fp32 on CPU; other cases always run torch); with
    the native kernel, rows on distinct adapters take the grouped route too."""

    AUTO = "auto"  # the native kernel where it built and was faster here (timed at start)
    NATIVE = "native"  # the native kernel; the engine refuses to start without it
    TORCH = "torch"  # torch's gather + bmm + index_add


@dataclass(frozen=True)
class LoraTiming:
    in_features: int
    out_features: int
    rows: int
    adapters: int
    native_s: float
    torch_s: float


@dataclass(frozen=True)
class LoraKernelChoice:
    """The kernel in use (None: torch's ops) and, for auto, what was measured (and why not, if it did not build)."""

    kernel: GroupedKernel | None
    timings: tuple[LoraTiming, ...] = ()
    unavailable: str | None = None

    @property
    def ratio(self) -> float | None:
        """torch's time over the native kernel's, summed over the cells; None when nothing was timed."""
        native = sum(t.native_s for t in self.timings)
        return sum(t.torch_s for t in self.timings) / native if native > 0 else None

    def describe(self) -> str:
        lines = [
            f"{t.in_features}->{t.out_features} rows={t.rows} adapters={t.adapters}: "
            f"native {t.native_s * 1e6:.1f} us, torch {t.torch_s * 1e6:.1f} us"
            for t in self.timings
        ]
        used = "native" if self.kernel is not None else "torch"
        why = f" ({self.unavailable})" if self.unavailable else ""
        ratio = f", torch/native {self.ratio:.2f}x" if self.ratio is not None else ""
        return "\n".join([*lines, f"-> {used}{why}{ratio}"])


def start_lora_kernel(model: nn.Module, kind: LoraKernel, *, max_batch_rows: int) -> LoraKernelChoice:
    """The grouped-LoRA kernel the engine's decode plans run (on the engine's thread: its OpenMP pool)."""
    if kind is LoraKernel.TORCH:
        return LoraKernelChoice(kernel=None)
    try:
        kernel = load_grouped_kernel()
    except NativeKernelUnavailable as exc:
        if kind is LoraKernel.NATIVE:
            raise
        log.warning("--lora-kernel auto: torch's grouped route (the native kernel is unavailable: %s)", exc)
        return LoraKernelChoice(kernel=None, unavailable=str(exc))
    if kind is LoraKernel.NATIVE:
        return LoraKernelChoice(kernel=kernel)
    timings = tuple(_time_cells(model, kernel, max_batch_rows=max_batch_rows))
    native = sum(t.native_s for t in timings)
    choice = LoraKernelChoice(kernel=kernel if native <= sum(t.torch_s for t in timings) else None, timings=timings)
    log.info("--lora-kernel auto measured:\n%s", choice.describe())
    return choice


def _time_cells(model: nn.Module, kernel: GroupedKernel, *, max_batch_rows: int) -> list[LoraTiming]:
    linears = _decoder_linears(model)
    shapes = sorted({(m.in_features, m.out_features) for m in linears})
    # a model whose linears fit in the caches (the tests' tiny ones) is timed from them: start stays fast
    streamed = sum(m.weight.nbytes for m in linears) > STREAM_BYTES
    gen = torch.Generator().manual_seed(0)
    cells = []
    with torch.no_grad():
        for rows, adapters in _mixes(max_batch_rows):
            for d_in, d_out in shapes:
                loras = [random_lora(d_in, d_out, RANK, gen, scale=0.02) for _ in range(adapters)]
                copies = max(1, min(MAX_COPIES, STREAM_BYTES // (adapters * RANK * (d_in + d_out) * 4)))
                copies = copies if streamed else 1
                # each copy its own adapters (the native route reads them in place; torch's stacks them)
                batches = [[_copy(loras[i % adapters]) for i in range(adapters)] for _ in range(copies)]
                row_sets = [[batch[i % adapters] for i in range(rows)] for batch in batches]
                x = torch.randn(rows, 1, d_in, generator=gen)
                out = torch.zeros(rows, 1, d_out)
                native = [GroupedLinear(r, kernel=kernel) for r in row_sets]
                torch_routes = [GroupedLinear(r) for r in row_sets]  # what the plan runs without the kernel
                cells.append(
                    LoraTiming(
                        d_in, d_out, rows, adapters, _fastest_pass(native, x, out), _fastest_pass(torch_routes, x, out)
                    )
                )
    return cells


def _mixes(max_batch_rows: int) -> list[tuple[int, int]]:
    """(rows, distinct adapters) to time, rows sharing adapters (the grouped route's batches): a small batch
    over 2 adapters, the largest over up to 8 (at least 2 rows each)."""
    small, large = min(8, max_batch_rows), max_batch_rows
    mixes = [(small, max(1, small // 4)), (large, max(1, min(8, large // 4)))]
    return sorted(dict.fromkeys(m for m in mixes if m[1] >= 2 and m[0] >= 2 * m[1]))


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    """The model's nn.Linear layers but its output head (adapters target the decoder's)."""
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def _copy(lora: LinearLora) -> LinearLora:
    return LinearLora(lora.At.clone(), lora.Bt.clone(), None, lora.scaling)


def _fastest_pass(routes: Sequence[Route], x: Tensor, out: Tensor) -> float:
    """Seconds per route of the fastest pass over them all (the deltas add into one output)."""
    base: Callable[[Tensor], Tensor] = lambda _x: out  # noqa: E731
    passes, best, start = 0, float("inf"), time.perf_counter()
    for route in routes:  # untimed warm-up
        route.forward(base, x, (), {})  # type: ignore[arg-type]
    while passes < MIN_RUNS or (passes < MAX_RUNS and time.perf_counter() - start < CELL_SECONDS * len(routes)):
        began = time.perf_counter()
        for route in routes:
            route.forward(base, x, (), {})  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - began)
        passes += 1
    return best / len(routes)
