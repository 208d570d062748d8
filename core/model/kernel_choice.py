"""``--linear-kernel auto``: which GEMM runs each linear layer, decided on this machine by timing them.

oneDNN's packed kernels ran a decode step 1.5-1.7x faster than torch's MKL path on one AMD EPYC, and the
same default was *slower* on an Intel Xeon with AMX (issue #13); on an AVX2-only EPYC the winner changes with
the number of rows; loramux's native skinny kernel (native_linear.py, AVX-512) beat both at decode rows on
that Intel Xeon. So at engine start, on the engine's thread, each distinct linear shape of the model is timed
with each kernel at the row counts the engine will run (``row_buckets``: decode batches up to
``max_batch_rows``, and a prefill chunk; the native kernel where it takes the rows), and every layer of that
shape runs, at each row count, the kernel that was fastest at the nearest measured count at or above it
(``OneDnnLinear.kernel_rows``). The table is logged and kept (``KernelChoice``) for the bench to print.
Results agree with every kernel's to fp32 rounding, so the choice changes speed only.

Timing is bounded: each (shape, rows, kernel) cell runs at least ``MIN_RUNS`` passes and until ``CELL_SECONDS``
have passed (at most ``MAX_RUNS``), after one untimed warm-up pass (oneDNN packs and JITs on first use); a pass
calls the kernel once on each of up to ``MAX_COPIES`` copies of the weight (``STREAM_BYTES``: from memory, as in
a forward, not from the cache; weights under ``STREAMED_FROM`` are timed alone), and a cell's time is its
fastest pass per call. q/k/v and gate/up run as one GEMM each (``fused_linears``) at the row counts where that
took at most ``FUSED_MARGIN`` of the members' own GEMMs; their fused shapes are timed like the others.
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

from loramux.core.model.fused_linears import FusedSiblings, fuse_siblings, fused_layers
from loramux.core.model.huge_pages import move_to_huge_pages
from loramux.core.model.linear_kernels import (
    LinearKernel,
    OneDnnLinear,
    _onednn_linear,
    _pack,
    onednn_dtypes,
    plain_linears,
    use_linear_kernel,
)
from loramux.core.model.native_linear import MAX_ROWS, NativeLinear, native_linear

log = logging.getLogger(__name__)

MIN_RUNS: Final = 3
# A forward streams every weight from memory (a model's linears are larger than the cache), but one layer
# timed over and over runs from the cache: 512x512 at one row took 0.012 ms that way on the Intel Xeon, a
# twentieth of a streamed read. Each cell cycles through copies of the weight adding up to this many bytes
# (past the L3 caches of the CPUs seen, 32 MB), so the kernel that streams faster wins.
STREAM_BYTES: Final = 64 * 2**20
MAX_COPIES: Final = 64
# q/k/v (gate/up) run as one GEMM at a row count where it took at most this share of the members' GEMMs: the
# margin covers timing noise and the Python of handing out slices (a few microseconds a call)
FUSED_MARGIN: Final = 0.9
STREAMED_FROM: Final = 256 * 2**10  # a smaller weight (the tests' tiny models) is timed alone: start stays fast
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
    native_s: float | None = None  # None: not timed (no native kernel here, or rows or dtype it does not take)

    def seconds(self) -> dict[LinearKernel, float]:
        """Each timed kernel's seconds, in the order ties go: oneDNN, torch, native."""
        timed = {LinearKernel.ONEDNN: self.onednn_s, LinearKernel.TORCH: self.torch_s}
        return timed | ({LinearKernel.NATIVE: self.native_s} if self.native_s is not None else {})

    @property
    def fastest(self) -> LinearKernel:
        timed = self.seconds()
        return min(timed, key=timed.__getitem__)

    @property
    def unpacked(self) -> LinearKernel:
        """The faster of the kernels that need no packed copy (torch, native): what an unfused member runs."""
        timed = {k: s for k, s in self.seconds().items() if k is not LinearKernel.ONEDNN}
        return min(timed, key=timed.__getitem__)


@dataclass(frozen=True)
class KernelChoice:
    """What ``auto`` measured and chose: one timing per (shape, rows)."""

    timings: tuple[KernelTiming, ...]
    native_unavailable: str | None = None  # why the native kernel was not timed, where it was not

    def at(self, shape: Shape, rows: int) -> KernelTiming:
        """The timing of ``shape`` at ``rows`` (one of the timed counts)."""
        return next(t for t in self.timings if _timing_shape(t) == shape and t.rows == rows)

    def kernel_rows(self, shape: Shape) -> tuple[tuple[int, LinearKernel], ...]:
        """(rows, fastest kernel) for ``shape``, by rows."""
        return tuple((t.rows, t.fastest) for t in self.timings if (t.out_features, t.in_features, t.dtype) == shape)

    def describe(self) -> str:
        lines = []
        for t in self.timings:
            timed = ", ".join(f"{k.value} {s * 1e3:.3f} ms" for k, s in t.seconds().items())
            lines.append(
                f"{t.out_features}x{t.in_features} {str(t.dtype).removeprefix('torch.')} rows={t.rows}: "
                f"{timed} -> {t.fastest.value}"
            )
        if self.native_unavailable:
            lines.append(f"native not timed: {self.native_unavailable}")
        return "\n".join(lines)

    @property
    def summary(self) -> str:
        """e.g. 'onednn 9/12, torch 3/12' (cells each kernel won; native's too where it was timed)."""
        kernels = [LinearKernel.ONEDNN, LinearKernel.TORCH]
        if any(t.native_s is not None for t in self.timings):
            kernels.append(LinearKernel.NATIVE)
        n = len(self.timings)
        return ", ".join(f"{k.value} {sum(t.fastest is k for t in self.timings)}/{n}" for k in kernels)


def row_buckets(*, max_batch_rows: int, prefill_rows: int) -> tuple[int, ...]:
    """Row counts to time: 1, then x4 steps up to the batch's rows, the batch's rows, and a prefill's."""
    rows, r = {1, max_batch_rows, prefill_rows}, 4
    while r < max_batch_rows:
        rows.add(r)
        r *= 4
    return tuple(sorted(n for n in rows if n >= 1))


def start_linear_kernels(
    model: nn.Module, kernel: LinearKernel, *, max_batch_rows: int, prefill_rows: int, huge_pages: bool = False
) -> tuple[LinearKernel, KernelChoice | None]:
    """Put the model's linear layers on ``kernel`` (AUTO: measured here, ``choose_kernels``); returns the kernel
    in use (TORCH where oneDNN cannot run) and, for AUTO, what was measured. ``huge_pages``: then move the large
    CPU weights, fused ones included, into memory advised for huge pages (huge_pages.py), before oneDNN's
    packed copies are made for the decode row counts (a packed copy follows its weight's address)."""
    if kernel is not LinearKernel.AUTO:
        used, choice = use_linear_kernel(model, kernel), None
        if used in (LinearKernel.ONEDNN, LinearKernel.NATIVE):
            fuse_onednn_siblings(model)  # fused at every row count, as every layer is on the one kernel
    else:
        native = native_linear()
        if isinstance(native, str):
            log.info("linear kernel auto: the native kernel is not timed (%s)", native)
        rows = row_buckets(max_batch_rows=max_batch_rows, prefill_rows=prefill_rows)
        choice = choose_kernels(model, rows=rows, native=native)
        used = LinearKernel.AUTO if choice is not None else LinearKernel.TORCH
    if huge_pages:
        log.info("linear weights: %s", move_to_huge_pages([model, *fused_layers(model)]).describe())
        for layer in [*plain_linears(model), *fused_layers(model)]:
            if isinstance(layer, OneDnnLinear) and layer.packs:
                layer.prepack()  # a packed copy is keyed by its weight's address: packed again now, not mid-stream
    compile_decode_kernels(model, max_batch_rows=max_batch_rows)
    return used, choice


def compile_decode_kernels(model: nn.Module, *, max_batch_rows: int) -> None:
    """Run each distinct oneDNN linear shape once at every decode row count, 1 to ``max_batch_rows``, so that
    oneDNN builds (JIT-compiles) and caches each of those kernels now: not on the first step a batch has that
    many rows, and not as memory that appears while serving. Measured (AMD EPYC, the bench's model, 4 shapes):
    0.15 s here, and 70 MiB of oneDNN's cache that a server grew while its batch passed through those sizes
    (`make bench-scale` counted it against the adapters' budget). Layers on torch's GEMM need nothing."""
    layers = [*plain_linears(model), *fused_layers(model)]
    on_cpu = [m for m in layers if isinstance(m, OneDnnLinear) and m.weight.device.type == "cpu"]
    by_shape = _one_per_shape(on_cpu)
    start = time.perf_counter()
    with torch.no_grad():
        for module in by_shape.values():
            for rows in range(1, max_batch_rows + 1):
                if module.kernel_at(rows) is LinearKernel.ONEDNN:  # rows on other kernels build nothing
                    module(torch.zeros(rows, module.in_features, dtype=module.weight.dtype))
    if by_shape:
        log.info("oneDNN decode kernels for 1-%d rows built in %.2f s", max_batch_rows, time.perf_counter() - start)


def choose_kernels(
    model: nn.Module, *, rows: Sequence[int], timer: Timer | None = None, native: NativeLinear | str | None = None
) -> KernelChoice | None:
    """Time the kernels on each distinct CPU linear shape the model has (plain nn.Linear layers whose dtype
    oneDNN runs here; ``native``: the native kernel too, where it takes the rows, or why it cannot run), switch
    the model to OneDnnLinear with each layer's per-rows table; returns what was measured, or None (every layer
    left on torch's GEMM) when oneDNN runs none of them."""
    time_one = timer or _time_kernel
    layers = plain_linears(model)
    candidates = [m for m in layers if m.weight.device.type == "cpu" and m.weight.dtype in onednn_dtypes()]
    if not candidates:
        use_linear_kernel(model, LinearKernel.TORCH)
        return None
    use_linear_kernel(model, LinearKernel.ONEDNN)  # packs once; a shape torch wins everywhere drops its copy
    groups = fuse_onednn_siblings(model)
    candidates += [group.layer for group in groups]  # timed like the others: a fused shape gets its own table
    kernel = native if isinstance(native, NativeLinear) else None
    for module in candidates:
        assert isinstance(module, OneDnnLinear)
        module.native = kernel
    by_shape = _one_per_shape(candidates)  # OneDnnLinear now
    timings = []
    with torch.no_grad():
        for shape, timed in by_shape.items():
            for n in rows:
                onednn_s = time_one(LinearKernel.ONEDNN, timed, n)
                torch_s = time_one(LinearKernel.TORCH, timed, n)
                native_s = time_one(LinearKernel.NATIVE, timed, n) if kernel and _native_takes(shape, n) else None
                timings.append(KernelTiming(shape[0], shape[1], shape[2], n, onednn_s, torch_s, native_s))
    choice = KernelChoice(tuple(timings), native_unavailable=native if isinstance(native, str) else None)
    for module in candidates:
        assert isinstance(module, OneDnnLinear)
        table = choice.kernel_rows(_shape(module))
        module.kernel_rows = table
        if not any(k is LinearKernel.ONEDNN for _, k in table):
            module.drop_packed()
    for group in groups:
        group.fused_rows = _fused_rows(choice, group)
        for member in group.members:  # unfused, a member has no packed copy: it runs torch's GEMM or native
            assert isinstance(member, OneDnnLinear)
            member.kernel_rows = tuple((n, choice.at(_shape(member), n).unpacked) for n, _ in group.fused_rows)
    log.info("linear kernel auto: %s\n%s", choice.summary, choice.describe())
    if groups:
        log.info("q/k/v and gate/up as one GEMM at rows: %s", groups[0].fused_rows)
    return choice


def _native_takes(shape: Shape, rows: int) -> bool:
    return shape[2] == torch.float32 and rows <= MAX_ROWS


def _timing_shape(t: KernelTiming) -> Shape:
    return (t.out_features, t.in_features, t.dtype)


def _fused_rows(choice: KernelChoice, group: FusedSiblings) -> tuple[tuple[int, bool], ...]:
    """(rows, fuse) by rows: one GEMM, on its fastest kernel, plus handing out the members' slices, where that
    took at most FUSED_MARGIN of the members' own GEMMs (on the faster of torch's and native, as unfused
    members run: see fuse_onednn_siblings)."""
    table = []
    for n in sorted({t.rows for t in choice.timings}):
        fused = choice.at(_shape(group.layer), n)
        separate = sum(t.seconds()[t.unpacked] for t in (choice.at(_shape(m), n) for m in group.members))
        fused_s = min(fused.seconds().values()) + _slicing_s(group, n)
        table.append((n, fused_s <= FUSED_MARGIN * separate))
    return tuple(table)


def _slicing_s(group: FusedSiblings, rows: int) -> float:
    """Seconds the group takes to cut a fused output of ``rows`` rows into its members' (contiguous) outputs:
    a few small copies, which at one or four rows cost more than one GEMM saves (Intel Xeon, whole forward
    0.95x fused at 1-4 rows, 1.10-1.14x at 16-32)."""
    y = torch.zeros(rows, group.layer.out_features, dtype=group.layer.weight.dtype)
    best = float("inf")
    for _ in range(3 * MIN_RUNS):
        began = time.perf_counter()
        group.slices(y)
        best = min(best, time.perf_counter() - began)
    return best


def fuse_onednn_siblings(model: nn.Module) -> list[FusedSiblings]:
    """q/k/v and gate/up as one GEMM each (fused_linears.py); the group's layer takes over the members' packed
    copies (the memory stays that of one packed copy) and their kernel table. Returns the groups."""
    layers: list[FusedSiblings] = []
    for group in fuse_siblings(model, layer_class=OneDnnLinear):
        members: list[OneDnnLinear] = group.members  # type: ignore[assignment]
        layer = group.layer
        assert isinstance(layer, OneDnnLinear)
        layer.kernel_rows, layer.native = members[0].kernel_rows, members[0].native
        layer.packs = all(m.packs for m in members)
        for member in members:
            member.drop_packed()
        if layer.packs:
            layer.prepack()
        layers.append(group)
    return layers


def _one_per_shape(modules: Sequence[nn.Linear]) -> dict[Shape, OneDnnLinear]:
    """The first layer of each distinct shape (oneDNN's kernels depend on the shape, not the weights)."""
    by_shape: dict[Shape, OneDnnLinear] = {}
    for module in modules:
        kept = by_shape.setdefault(_shape(module), module)  # type: ignore[arg-type]
        if not kept.packs and getattr(module, "packs", False):  # a fused group's member has no packed copy:
            by_shape[_shape(module)] = module  # type: ignore[assignment]  # time oneDNN on a layer that has one
    return by_shape


def _shape(module: nn.Linear) -> Shape:
    return (module.out_features, module.in_features, module.weight.dtype)


def _time_kernel(kernel: LinearKernel, module: nn.Linear, rows: int) -> float:
    """Seconds one call takes, with the weight coming from memory as in a forward (see STREAM_BYTES)."""
    weight = module.weight.detach()
    nbytes = weight.numel() * weight.element_size()
    copies = min(MAX_COPIES, -(-STREAM_BYTES // nbytes)) if nbytes >= STREAMED_FROM else 1
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    x = torch.randn(rows, module.in_features, dtype=weight.dtype)
    if kernel is LinearKernel.ONEDNN:  # as the layer's own forward runs it: on its packed weight, or the plain one
        assert isinstance(module, OneDnnLinear)
        operands = [_pack(w) for w in weights] if module.packs else weights

        def run(i: int) -> Tensor:
            return _onednn_linear(x, operands[i], module.bias)
    elif kernel is LinearKernel.NATIVE:
        native = getattr(module, "native", None)
        assert native is not None

        def run(i: int) -> Tensor:
            return native(x, weights[i], module.bias)
    else:

        def run(i: int) -> Tensor:
            return F.linear(x, weights[i], module.bias)

    for i in range(copies):  # untimed: first-use JIT, and every copy touched once
        run(i)
    # the fastest pass, not the mean: on a shared VM a stolen slice lands in whichever cell runs then, and a
    # mean carries it into the choice (bench.engine saw auto at 0.90x the better fixed kernel on a noisy hour)
    runs, start, best = 0, time.perf_counter(), float("inf")
    while runs < MIN_RUNS or (runs < MAX_RUNS and time.perf_counter() - start < CELL_SECONDS):
        began = time.perf_counter()
        for i in range(copies):
            run(i)
        best = min(best, (time.perf_counter() - began) / copies)
        runs += 1
    return best
