"""``--linear-kernel auto``: which GEMM runs each linear layer, decided on this machine by timing both.

oneDNN's packed kernels ran a decode step 1.5-1.7x faster than torch's MKL path on one AMD EPYC, and the
same default was *slower* on an Intel Xeon with AMX (issue #13); on an AVX2-only EPYC the winner changes with
the number of rows. So at engine start, on the engine's thread, each distinct linear shape of the model is
timed with both kernels at the row counts the engine will run (``row_buckets``: decode batches up to
``max_batch_rows``, and a prefill chunk), and every layer of that shape runs, at each row count, the kernel
that was faster at the nearest measured count at or above it (``OneDnnLinear.onednn_rows``). The table is
logged and kept (``KernelChoice``) for the bench to print. Results agree with either kernel's to fp32
rounding, so the choice changes speed only.

Timing is bounded: each (shape, rows, kernel) cell runs at least ``MIN_RUNS`` times and until ``CELL_SECONDS``
have passed (at most ``MAX_RUNS``), after one untimed warm-up run (oneDNN packs and JITs on first use); a cell's
time is its fastest run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramux.core.model.linear_kernels import (
    LinearKernel,
    OneDnnLinear,
    onednn_dtypes,
    plain_linears,
    use_linear_kernel,
)

log = logging.getLogger(__name__)

MIN_RUNS: Final = 3
MAX_RUNS: Final = 50  # tiny layers (the tests' models) cost microseconds a cell
CELL_SECONDS: Final = 0.01

Shape = tuple[int, int, torch.dtype]  # (out features, in features, dtype)
# seconds one call of `kernel` takes on `rows` rows of a layer like `layer`
Timer = Callable[[LinearKernel, nn.Linear, int], float]


@dataclass(frozen=True)
class KernelTiming:
    out_features: int
    in_features: int
    dtype: torch.dtype
    rows: int
    onednn_s: float
    torch_s: float

    @property
    def onednn_wins(self) -> bool:
        return self.onednn_s < self.torch_s


@dataclass(frozen=True)
class KernelChoice:
    """What ``auto`` measured and chose: one timing per (shape, rows)."""

    timings: tuple[KernelTiming, ...]

    def onednn_rows(self, shape: Shape) -> tuple[tuple[int, bool], ...]:
        """(rows, oneDNN faster) for ``shape``, by rows."""
        return tuple((t.rows, t.onednn_wins) for t in self.timings if (t.out_features, t.in_features, t.dtype) == shape)

    def describe(self) -> str:
        lines = []
        for t in self.timings:
            winner = "onednn" if t.onednn_wins else "torch"
            lines.append(
                f"{t.out_features}x{t.in_features} {str(t.dtype).removeprefix('torch.')} rows={t.rows}: "
                f"onednn {t.onednn_s * 1e3:.3f} ms, torch {t.torch_s * 1e3:.3f} ms -> {winner}"
            )
        return "\n".join(lines)

    @property
    def summary(self) -> str:
        """e.g. 'onednn 9/12, torch 3/12' (cells each kernel won)."""
        wins = sum(t.onednn_wins for t in self.timings)
        return f"onednn {wins}/{len(self.timings)}, torch {len(self.timings) - wins}/{len(self.timings)}"


def row_buckets(*, max_batch_rows: int, prefill_rows: int) -> tuple[int, ...]:
    """Row counts to time: 1, then x4 steps up to the batch's rows, the batch's rows, and a prefill's."""
    rows, r = {1, max_batch_rows, prefill_rows}, 4
    while r < max_batch_rows:
        rows.add(r)
        r *= 4
    return tuple(sorted(n for n in rows if n >= 1))


def start_linear_kernels(
    model: nn.Module, kernel: LinearKernel, *, max_batch_rows: int, prefill_rows: int
) -> tuple[LinearKernel, KernelChoice | None]:
    """Put the model's linear layers on ``kernel`` (AUTO: measured here, ``choose_kernels``); returns the kernel
    in use (TORCH where oneDNN cannot run) and, for AUTO, what was measured."""
    if kernel is not LinearKernel.AUTO:
        used, choice = use_linear_kernel(model, kernel), None
    else:
        choice = choose_kernels(model, rows=row_buckets(max_batch_rows=max_batch_rows, prefill_rows=prefill_rows))
        used = LinearKernel.AUTO if choice is not None else LinearKernel.TORCH
    compile_decode_kernels(model, max_batch_rows=max_batch_rows)
    return used, choice


def compile_decode_kernels(model: nn.Module, *, max_batch_rows: int) -> None:
    """Run each distinct oneDNN linear shape once at every decode row count, 1 to ``max_batch_rows``, so that
    oneDNN builds (JIT-compiles) and caches each of those kernels now: not on the first step a batch has that
    many rows, and not as memory that appears while serving. Measured (AMD EPYC, the bench's model, 4 shapes):
    0.15 s here, and 70 MiB of oneDNN's cache that a server grew while its batch passed through those sizes
    (`make bench-scale` counted it against the adapters' budget). Layers on torch's GEMM need nothing."""
    on_cpu = [m for m in plain_linears(model) if isinstance(m, OneDnnLinear) and m.weight.device.type == "cpu"]
    by_shape = _one_per_shape(on_cpu)
    start = time.perf_counter()
    with torch.no_grad():
        for module in by_shape.values():
            for rows in range(1, max_batch_rows + 1):
                if module._onednn_at(rows):  # rows auto put on torch's GEMM build nothing
                    module(torch.zeros(rows, module.in_features, dtype=module.weight.dtype))
    if by_shape:
        log.info("oneDNN decode kernels for 1-%d rows built in %.2f s", max_batch_rows, time.perf_counter() - start)


def choose_kernels(model: nn.Module, *, rows: Sequence[int], timer: Timer | None = None) -> KernelChoice | None:
    """Time both kernels on each distinct CPU linear shape the model has (plain nn.Linear layers whose dtype
    oneDNN runs here), switch the model to OneDnnLinear with each layer's per-rows table; returns what was
    measured, or None (every layer left on torch's GEMM) when oneDNN runs none of them."""
    time_one = timer or _time_kernel
    layers = plain_linears(model)
    candidates = [m for m in layers if m.weight.device.type == "cpu" and m.weight.dtype in onednn_dtypes()]
    if not candidates:
        use_linear_kernel(model, LinearKernel.TORCH)
        return None
    use_linear_kernel(model, LinearKernel.ONEDNN)  # packs once; a shape torch wins everywhere drops its copy
    by_shape = _one_per_shape(candidates)  # OneDnnLinear now
    timings = []
    with torch.no_grad():
        for shape, timed in by_shape.items():
            for n in rows:
                onednn_s = time_one(LinearKernel.ONEDNN, timed, n)
                torch_s = time_one(LinearKernel.TORCH, timed, n)
                timings.append(KernelTiming(shape[0], shape[1], shape[2], n, onednn_s, torch_s))
    choice = KernelChoice(tuple(timings))
    for module in candidates:
        assert isinstance(module, OneDnnLinear)
        table = choice.onednn_rows(_shape(module))
        module.onednn_rows = table
        if not any(wins for _, wins in table):
            module.drop_packed()
    log.info("linear kernel auto: %s\n%s", choice.summary, choice.describe())
    return choice


def _one_per_shape(modules: Sequence[nn.Linear]) -> dict[Shape, OneDnnLinear]:
    """The first layer of each distinct shape (oneDNN's kernels depend on the shape, not the weights)."""
    by_shape: dict[Shape, OneDnnLinear] = {}
    for module in modules:
        by_shape.setdefault(_shape(module), module)  # type: ignore[arg-type]
    return by_shape


def _shape(module: nn.Linear) -> Shape:
    return (module.out_features, module.in_features, module.weight.dtype)


def _time_kernel(kernel: LinearKernel, module: nn.Linear, rows: int) -> float:
    x = torch.randn(rows, module.in_features, dtype=module.weight.dtype)
    if kernel is LinearKernel.ONEDNN:  # the layer's own forward: no table yet, so oneDNN at every row count
        assert isinstance(module, OneDnnLinear) and module.onednn_rows is None

        def run() -> Tensor:
            return module(x)
    else:

        def run() -> Tensor:
            return F.linear(x, module.weight, module.bias)

    run()  # untimed: first-use JIT and packing
    # the fastest run, not the mean: on a shared VM a stolen slice lands in whichever cell runs then, and a
    # mean carries it into the choice (bench.engine saw auto at 0.90x the better fixed kernel on a noisy hour)
    runs, start, best = 0, time.perf_counter(), float("inf")
    while runs < MIN_RUNS or (runs < MAX_RUNS and time.perf_counter() - start < CELL_SECONDS):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
        runs += 1
    return best
