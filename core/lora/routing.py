"""Per-row adapter routing: a plan kept in step with the batch as rows join and leave, applied by every wrapped module.

A ``RoutingPlan`` says, for each wrapped module, how to add each row's LoRA delta. It is handed to a forward
pass through a ContextVar (``use_plan``), never stored on the model: two threads (or tasks) can run forwards
with different plans, and the plan is gone when the ``with`` block exits, even if the forward raised.

The per-row math is the hot path of every decode step. bench/lora_routing.py measures gather-bmm against a
loop over adapters (PEFT's mixed batch) and one wide masked matmul over stacked adapters; gather-bmm won in
every case measured (BENCHMARKS.md) where rows use distinct adapters; three routes remain:
- ``UniformLinear``: every row uses one adapter: two thin matmuls, the add fused into the second (or, in
  the native decode layers, the grouped kernel's call on one segment of every row).
- ``GatheredLinear`` (gathered.py): per-row A/B stacks gathered when rows join (``extend_plan`` writes only theirs) and
  compacted when rows leave (``RoutingPlan.compact`` moves only the tail rows), then one bmm and one fused
  baddbmm per step. Rows without the module's LoRA get zero weights, adding exactly 0.
- ``GroupedLinear`` (grouped.py): rows share adapters, or the decode plan holds the native kernel: each
  distinct adapter's weights read once per step, where they lie.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramux.core.lora.gathered import GatheredLinear
from loramux.core.lora.grouped import GroupedLinear, prefers_grouped
from loramux.core.lora.native_kernel import GroupedKernel, Segments, takes
from loramux.core.lora.route import Route, add_delta, decode_input, move_rows
from loramux.core.lora.segmented import SegmentedLinear
from loramux.core.lora.weights import AdapterWeights, EmbeddingLora, LinearLora, common_dtype
from loramux.core.lora.workspace import RoutingWorkspace
from loramux.core.native import NativeLora


@dataclass(frozen=True)
class RoutingPlan:
    rows: int
    routes: Mapping[str, Route]

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> RoutingPlan:
        """The plan after rows left the batch (see ``swap_remove``): only the moved rows are copied, where a
        rebuild would copy every row's stacks (115 ms at 64 distinct adapters). Updates the routes in place."""
        for route in self.routes.values():
            route.compact(moves, rows)
        return RoutingPlan(rows=rows, routes=self.routes)

    def release(self) -> None:
        """The plan is dropped: routes give their buffers back to the workspace they came from (if any)."""
        for route in self.routes.values():
            route.release()


def extend_plan(
    plan: RoutingPlan,
    rows: Sequence[AdapterWeights | None],
    new: Sequence[AdapterWeights | None],
    *,
    workspace: RoutingWorkspace | None = None,
) -> RoutingPlan:
    """The plan after rows ``new`` join a batch routed by ``plan`` (whose rows are ``rows``). Gathered linear
    routes append the new rows' slices in place; any other change (a uniform route turning mixed, a larger
    rank, embeddings, modules_to_save) rebuilds that module's route."""
    combined = [*rows, *new]
    rebuilt = build_plan(combined, reuse=plan.routes, new_rows=new, workspace=workspace)
    return RoutingPlan(rows=len(combined), routes=rebuilt.routes)


def swap_remove(n: int, removed: set[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows left a batch of n: (order, moves). order[i] is the old index of new row i; each hole below the new
    size is filled by a surviving row from the tail (moves: (dst, src)), so the other rows stay where they are."""
    kept = n - len(removed)
    holes = [i for i in sorted(removed) if i < kept]
    tail = [j for j in range(kept, n) if j not in removed]
    moves = list(zip(holes, tail, strict=True))
    order = list(range(kept))
    for dst, src in moves:
        order[dst] = src
    return order, moves


_CURRENT_PLAN: ContextVar[RoutingPlan | None] = ContextVar("loramux_routing_plan", default=None)


current_plan = _CURRENT_PLAN.get  # bound method: the cheapest lookup on the per-module hot path


@contextmanager
def use_plan(plan: RoutingPlan) -> Iterator[RoutingPlan]:
    token = _CURRENT_PLAN.set(plan)
    try:
        yield plan
    finally:
        _CURRENT_PLAN.reset(token)


class UniformLinear(Route):
    def __init__(self, lora: LinearLora, *, kernel: GroupedKernel | None = None) -> None:
        self.At = lora.At  # (in, r)
        self.Bt = lora.Bt * lora.scaling  # (r, out), scaling folded in
        self.bias = lora.bias * lora.scaling if lora.bias is not None else None
        self._lora, self._kernel = lora, kernel if kernel is not None and takes(lora) else None
        self._native: dict[int, tuple[Segments, NativeLora]] = {}  # by rows: one segment of every row

    def native_lora(self, rows: int) -> NativeLora | None:
        """With the grouped kernel (a decode plan's): its call for one segment of all ``rows`` rows."""
        if self._kernel is None:
            return None
        found = self._native.get(rows)
        if found is None:
            segments = Segments.of([self._lora], [list(range(rows))])
            found = self._native[rows] = (segments, self._kernel.native_lora(segments))
        return found[1]

    def adds_into(self, x: Tensor) -> bool:
        return self.bias is None and decode_input(x, self.At.dtype)

    def add_into(self, x: Tensor, out: Tensor) -> None:
        h = torch.matmul(x, self.At)  # (N, 1, r)
        out.addmm_(h.view(h.shape[0], -1), self.Bt)  # out + h @ Bt, in place, a strided slice too

    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        out = base_layer(x, *args, **kwargs)  # (..., out)
        h = torch.matmul(x.to(self.At.dtype), self.At)  # (..., r)
        if out.dtype == h.dtype and self.bias is None:  # fused add: out + h @ Bt
            out2, h2 = out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
            if out.requires_grad or not out.is_contiguous():
                return torch.addmm(out2, h2, self.Bt).view(out.shape)
            out2.addmm_(h2, self.Bt)  # in place into the fresh base output: add_into's ops, bit for bit
            return out
        return add_delta(out, F.linear(h, self.Bt.T, self.bias))


class RoutedEmbedding(Route):
    """Distinct adapters' A stacked once; each row looks up its own adapter's slice (slot 0 = zeros)."""

    def __init__(self, row_loras: Sequence[EmbeddingLora | None]) -> None:
        distinct = list({id(lo): lo for lo in row_loras if lo is not None}.values())
        r_max = max(lo.A.shape[0] for lo in distinct)
        dtype = common_dtype(lo.A for lo in distinct)
        zero_a = distinct[0].A.new_zeros(distinct[0].A.shape[1], r_max, dtype=dtype)
        self.A_stack = torch.stack(
            [zero_a] + [F.pad(lo.A.to(dtype), (0, 0, 0, r_max - lo.A.shape[0])).T for lo in distinct]
        )  # (U+1, V, r_max)
        slot_of = {id(lo): i + 1 for i, lo in enumerate(distinct)}
        self.row_slot = torch.tensor([slot_of[id(lo)] if lo is not None else 0 for lo in row_loras])  # (N,)
        self.row_slot = self.row_slot.to(zero_a.device)
        d = distinct[0].B.shape[0]
        self.Bt = torch.stack(
            [
                F.pad((lo.B * lo.scaling).to(dtype), (0, r_max - lo.B.shape[1])).T
                if lo is not None
                else zero_a.new_zeros(r_max, d)
                for lo in row_loras
            ]
        )  # (N, r_max, d)

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> None:
        self.row_slot, self.Bt = move_rows(self.row_slot, moves, rows), move_rows(self.Bt, moves, rows)

    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        out = base_layer(x, *args, **kwargs)  # (N, T, d)
        ids = x.reshape(x.shape[0], -1)  # (N, T)
        after_a = self.A_stack[self.row_slot[:, None], ids]  # (N, T, r_max)
        delta = torch.bmm(after_a, self.Bt).reshape(*out.shape)
        embed_scale = getattr(base_layer, "embed_scale", None)
        if isinstance(embed_scale, Tensor | float):
            delta = delta * embed_scale
        return add_delta(out, delta)


class SavedModules(Route):
    """modules_to_save: rows of an adapter with a copy run that copy; the others run the base module, or
    ``fallback`` when other adapters in the batch put LoRA on this same module."""

    def __init__(self, row_modules: Sequence[nn.Module | None], *, fallback: Route | None = None) -> None:
        self.fallback = fallback
        self._group(list(row_modules))

    def _group(self, row_modules: list[nn.Module | None]) -> None:
        self.row_modules = row_modules
        self.uniform = row_modules[0] if all(m is row_modules[0] for m in row_modules) else None
        distinct = {id(m): m for m in row_modules if m is not None}
        self.groups = [
            (torch.tensor([i for i, m in enumerate(row_modules) if m is mod], device=_device_of(mod)), mod)
            for mod in distinct.values()
        ]

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> None:
        row_modules = list(self.row_modules)
        for dst, src in moves:
            row_modules[dst] = row_modules[src]
        self._group(row_modules[:rows])
        if self.fallback is not None:
            self.fallback.compact(moves, rows)

    def release(self) -> None:
        if self.fallback is not None:
            self.fallback.release()

    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        if self.uniform is not None:
            return self.uniform(x, *args, **kwargs)
        if self.fallback is not None:
            out = self.fallback.forward(base_layer, x, args, kwargs)
        else:
            out = base_layer(x, *args, **kwargs)
        for rows, module in self.groups:
            copied = module(x.index_select(0, rows), *args, **kwargs)
            out = out.index_copy(0, rows, copied.to(out.dtype))
        return out


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def linear_route(
    row_loras: Sequence[LinearLora | None], *, workspace: RoutingWorkspace | None = None, name: str = ""
) -> Route:
    """Uniform when one adapter covers every row; grouped by adapter when rows share adapters (each read once
    per step) or the workspace holds the native kernel; else gather-bmm over per-row stacks (fastest of
    torch's ops for distinct adapters, bench/lora_routing.py)."""
    first = row_loras[0]
    kernel = workspace.grouped_kernel if workspace is not None else None  # a decode plan's (grouped.py)
    if first is not None and all(lo is first for lo in row_loras):
        return UniformLinear(first, kernel=kernel)
    if prefers_grouped(row_loras, native=kernel is not None):
        return GroupedLinear(row_loras, kernel=kernel)
    return GatheredLinear(row_loras, workspace=workspace, name=name)


def _keeps(route: Route, row_loras: Sequence[LinearLora | None], workspace: RoutingWorkspace | None) -> bool:
    """Is ``route`` (gathered or grouped) still the kind linear_route would pick for these rows?"""
    native = workspace is not None and workspace.grouped_kernel is not None
    return isinstance(route, GroupedLinear) == prefers_grouped(row_loras, native=native)


def build_plan(
    rows: Sequence[AdapterWeights | None],
    *,
    reuse: Mapping[str, Route] | None = None,
    new_rows: Sequence[AdapterWeights | None] = (),
    workspace: RoutingWorkspace | None = None,
    segmented: bool = False,
) -> RoutingPlan:
    """One route per module that at least one row's adapter touches. rows[i] is row i's adapter (None: base).

    segmented (a prefill's plan, used for one forward): linear modules loop over runs of rows on one adapter
    (segmented.py) instead of stacking weights per row or per adapter.

    reuse/new_rows (from extend_plan): rows ends with new_rows, and reuse holds the routes of the rows before
    them; gathered linear routes there are extended in place instead of rebuilt. With a workspace, gathered
    routes lease their buffers from it, and a gathered route replaced by another kind gives them back."""
    adapters = [a for a in rows if a is not None]
    routes: dict[str, Route] = {}
    for name in dict.fromkeys(n for a in adapters for n in a.linear):
        old = (reuse or {}).get(name)
        added = [a.linear.get(name) if a is not None else None for a in new_rows]
        combined = [a.linear.get(name) if a is not None else None for a in rows]
        if (
            isinstance(old, GatheredLinear | GroupedLinear)
            and old.can_append(added)
            and _keeps(old, combined, workspace)
        ):
            old.append(added)
            routes[name] = old
            continue
        if segmented:
            routes[name] = SegmentedLinear(combined)
            continue
        routes[name] = linear_route(combined, workspace=workspace, name=name)
    for name in dict.fromkeys(n for a in adapters for n in a.embedding):
        routes[name] = RoutedEmbedding([a.embedding.get(name) if a is not None else None for a in rows])
    for name in dict.fromkeys(n for a in adapters for n in a.saved_modules):
        saved = [a.saved_modules.get(name) if a is not None else None for a in rows]
        routes[name] = SavedModules(saved, fallback=routes.get(name))
    for name, old in (reuse or {}).items():  # after the build succeeded: the old plan is not used again
        if routes.get(name) is not old and not isinstance(routes.get(name), GatheredLinear):
            old.release()  # a new gathered route holds a lease of its own: the old buffers just go
    return RoutingPlan(rows=len(rows), routes=routes)
