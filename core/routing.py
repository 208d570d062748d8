"""Per-row adapter routing: a plan built once per batch composition, applied by every wrapped module.

A ``RoutingPlan`` says, for each wrapped module, how to add each row's LoRA delta. It is handed to a forward
pass through a ContextVar (``use_plan``), never stored on the model: two threads (or tasks) can run forwards
with different plans, and the plan is gone when the ``with`` block exits, even if the forward raised.

The per-row math (hot path of every decode step) has three strategies, benchmarked in bench/lora_routing.py:
- ``UniformLinear``: every row uses one adapter: two thin matmuls.
- ``GatheredLinear``: per-row A/B stacks gathered once per plan, one bmm pair per step (gather-bmm).
- ``GroupedLinear``: one matmul pair per distinct adapter over its rows (PEFT's loop), for few adapters and
  many rows, where per-row copies would cost more memory than they save time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.lora_weights import AdapterWeights, EmbeddingLora, LinearLora

BaseForward = Callable[[Tensor], Tensor]


class Route:
    """How one wrapped module computes its output for the rows of a plan."""

    def forward(self, base_layer: nn.Module, x: Tensor, base_forward: BaseForward) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class RoutingPlan:
    rows: int
    routes: Mapping[str, Route]


_CURRENT_PLAN: ContextVar[RoutingPlan | None] = ContextVar("loramux_routing_plan", default=None)


def current_plan() -> RoutingPlan | None:
    return _CURRENT_PLAN.get()


@contextmanager
def use_plan(plan: RoutingPlan) -> Iterator[RoutingPlan]:
    token = _CURRENT_PLAN.set(plan)
    try:
        yield plan
    finally:
        _CURRENT_PLAN.reset(token)


def _add_delta(out: Tensor, delta: Tensor) -> Tensor:
    """PEFT: the delta is computed in the LoRA dtype, added (promoted), then cast once to the base dtype."""
    return (out + delta).to(out.dtype)


class UniformLinear(Route):
    def __init__(self, lora: LinearLora) -> None:
        self.A = lora.A  # (r, in)
        self.B = lora.B * lora.scaling  # (out, r), scaling folded in
        self.bias = lora.bias * lora.scaling if lora.bias is not None else None

    def forward(self, base_layer: nn.Module, x: Tensor, base_forward: BaseForward) -> Tensor:
        out = base_forward(x)
        h = F.linear(x.to(self.A.dtype), self.A)  # (..., r)
        return _add_delta(out, F.linear(h, self.B, self.bias))


class GatheredLinear(Route):
    """Rows without this module's LoRA get zero weights, which adds exactly 0."""

    def __init__(self, row_loras: Sequence[LinearLora | None]) -> None:
        r_max = max(lo.A.shape[0] for lo in row_loras if lo is not None)
        dtype = _common_dtype(lo.A for lo in row_loras if lo is not None)
        ref = next(lo for lo in row_loras if lo is not None)
        n_in, n_out = ref.A.shape[1], ref.B.shape[0]
        a_rows, b_rows, bias_rows = [], [], []
        for lo in row_loras:
            a = lo.A if lo is not None else ref.A.new_zeros(0, n_in)
            b = lo.B * lo.scaling if lo is not None else ref.B.new_zeros(n_out, 0)
            a_rows.append(F.pad(a.to(dtype), (0, 0, 0, r_max - a.shape[0])).T)  # (in, r_max)
            b_rows.append(F.pad(b.to(dtype), (0, r_max - b.shape[1])).T)  # (r_max, out)
            bias = lo.bias * lo.scaling if lo is not None and lo.bias is not None else None
            bias_rows.append(bias.to(dtype) if bias is not None else ref.A.new_zeros(n_out, dtype=dtype))
        self.At = torch.stack(a_rows)  # (N, in, r_max)
        self.Bt = torch.stack(b_rows)  # (N, r_max, out)
        has_bias = any(lo is not None and lo.bias is not None for lo in row_loras)
        self.bias = torch.stack(bias_rows).unsqueeze(1) if has_bias else None  # (N, 1, out)

    def forward(self, base_layer: nn.Module, x: Tensor, base_forward: BaseForward) -> Tensor:
        out = base_forward(x)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.At.dtype)  # (N, T, in)
        h = torch.bmm(x3, self.At)  # (N, T, r_max)
        delta = torch.bmm(h, self.Bt) if self.bias is None else torch.baddbmm(self.bias, h, self.Bt)
        return _add_delta(out, delta.reshape(*out.shape))


class GroupedLinear(Route):
    def __init__(self, groups: Sequence[tuple[Tensor, UniformLinear]]) -> None:
        self.groups = groups  # (row indices (n,), route for those rows)

    def forward(self, base_layer: nn.Module, x: Tensor, base_forward: BaseForward) -> Tensor:
        out = base_forward(x)
        for rows, uniform in self.groups:
            xs = x.index_select(0, rows).to(uniform.A.dtype)
            delta = F.linear(F.linear(xs, uniform.A), uniform.B, uniform.bias)  # (n, ..., out)
            out = out.index_add(0, rows, delta.to(out.dtype))  # PEFT's mixed batch casts before adding
        return out


class RoutedEmbedding(Route):
    """Distinct adapters' A stacked once; each row looks up its own adapter's slice (slot 0 = zeros)."""

    def __init__(self, row_loras: Sequence[EmbeddingLora | None]) -> None:
        distinct = list({id(lo): lo for lo in row_loras if lo is not None}.values())
        r_max = max(lo.A.shape[0] for lo in distinct)
        dtype = _common_dtype(lo.A for lo in distinct)
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

    def forward(self, base_layer: nn.Module, x: Tensor, base_forward: BaseForward) -> Tensor:
        out = base_forward(x)  # (N, T, d)
        ids = x.reshape(x.shape[0], -1)  # (N, T)
        after_a = self.A_stack[self.row_slot[:, None], ids]  # (N, T, r_max)
        delta = torch.bmm(after_a, self.Bt).reshape(*out.shape)
        embed_scale = getattr(base_layer, "embed_scale", None)
        if isinstance(embed_scale, Tensor | float):
            delta = delta * embed_scale
        return _add_delta(out, delta)


class SavedModules(Route):
    """modules_to_save: rows of an adapter with a copy run that copy; the others run the base module."""

    def __init__(self, row_modules: Sequence[nn.Module | None]) -> None:
        self.uniform = row_modules[0] if all(m is row_modules[0] for m in row_modules) else None
        distinct = {id(m): m for m in row_modules if m is not None}
        device = next(next(iter(distinct.values())).parameters()).device
        self.groups = [
            (torch.tensor([i for i, m in enumerate(row_modules) if m is mod], device=device), mod)
            for mod in distinct.values()
        ]

    def forward(self, base_layer: nn.Module, x: Tensor, base_forward: BaseForward) -> Tensor:
        if self.uniform is not None:
            return self.uniform(x)
        out = base_forward(x)
        for rows, module in self.groups:
            out = out.index_copy(0, rows, module(x.index_select(0, rows)).to(out.dtype))
        return out


def _common_dtype(tensors: Iterator[Tensor] | Sequence[Tensor]) -> torch.dtype:
    dtype: torch.dtype | None = None
    for t in tensors:
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    assert dtype is not None
    return dtype


# Below this many rows per distinct adapter, per-row gathered stacks beat a loop over adapters.
GROUPED_MIN_ROWS_PER_ADAPTER = 4


def linear_route(row_loras: Sequence[LinearLora | None]) -> Route:
    distinct = {id(lo): lo for lo in row_loras}
    if len(distinct) == 1 and row_loras[0] is not None:
        return UniformLinear(row_loras[0])
    loras = [lo for lo in distinct.values() if lo is not None]
    if len(row_loras) >= GROUPED_MIN_ROWS_PER_ADAPTER * len(distinct):
        device = loras[0].A.device
        return GroupedLinear(
            [
                (torch.tensor([i for i, r in enumerate(row_loras) if r is lo], device=device), UniformLinear(lo))
                for lo in loras
            ]
        )
    return GatheredLinear(row_loras)


def build_plan(rows: Sequence[AdapterWeights | None]) -> RoutingPlan:
    """One route per module that at least one row's adapter touches. rows[i] is row i's adapter (None: base)."""
    adapters = [a for a in rows if a is not None]
    routes: dict[str, Route] = {}
    for name in dict.fromkeys(n for a in adapters for n in a.linear):
        routes[name] = linear_route([a.linear.get(name) if a is not None else None for a in rows])
    for name in dict.fromkeys(n for a in adapters for n in a.embedding):
        routes[name] = RoutedEmbedding([a.embedding.get(name) if a is not None else None for a in rows])
    for name in dict.fromkeys(n for a in adapters for n in a.saved_modules):
        routes[name] = SavedModules([a.saved_modules.get(name) if a is not None else None for a in rows])
    return RoutingPlan(rows=len(rows), routes=routes)
