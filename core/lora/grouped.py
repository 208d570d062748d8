"""The grouped LoRA route: rows grouped by adapter, so each distinct adapter's A and B are read once per step.

The gathered route (routing.GatheredLinear) keeps one A/B stack per *row*: 64 rows over 8 adapters read 64
adapters' worth of weights every step, though only 8 are distinct. Here each distinct adapter is read once.

With the native kernel (native_kernel.py, handed over by the engine's routing workspace) one C call a module
adds every row's delta into the base output in place, reading each adapter's A and B where they lie (nothing
stacked): a decode step's fp32 rows. Without it, or for a call it does not take (several tokens a row, another
dtype), torch's ops: the stacks hold each distinct adapter once, (K, in, r) and (K, r, out), and the rows are
gathered per adapter into a padded (K, M, in) block (M: the most rows any adapter has; padding slots repeat a
real row and are dropped), then two bmm calls (Punica's SGMV and S-LoRA's MBGMM do the same with custom
kernels). Each row's delta is the same x · A · B · s as PEFT's; rows without this module's LoRA (base rows) get
nothing added.

Rows joining or leaving only regroup the indices; torch's stacks are rebuilt (when first needed) after the set
of distinct adapters changed. ``prefers_grouped`` is the rule the plan uses to pick this route: rows sharing
adapters, and with the native kernel distinct adapters too (one-row segments). Alone, the kernel streamed
distinct adapters no faster than the gathered route's bmm (BENCHMARKS "Session 22"); what it adds is that its
deltas go into a row-strided output (``add_into``), so the decode step keeps q/k/v and gate/up as one GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loramux.core.lora.native_kernel import GroupedKernel, Segments, takes
from loramux.core.lora.route import Route, decode_input
from loramux.core.lora.weights import LinearLora, common_dtype, padded_rank
from loramux.core.native import NativeLora


def prefers_grouped(row_loras: Sequence[LinearLora | None], *, native: bool = False) -> bool:
    """Grouped when rows share adapters (at least two rows per distinct adapter on average) and no adapter has
    a LoRA bias; else the per-row stacks of the gathered route cost no more and need no regrouping. With the
    native kernel (``native``) also for distinct adapters the kernel takes: one-row segments read each adapter
    where it lies, no stacks, and the decode step adds them into its fused GEMMs' columns (8 rows on 8 distinct
    adapters, Intel Xeon: 11.6-12.4 ms a step against 12.2-13.0 on the gathered stacks; BENCHMARKS)."""
    present = [lo for lo in row_loras if lo is not None]
    if not present or any(lo.bias is not None for lo in present):
        return False
    if native and all(takes(lo) for lo in present):
        return True
    return 2 * len({id(lo) for lo in present}) <= len(present)


class GroupedLinear(Route):
    def __init__(self, row_loras: Sequence[LinearLora | None], *, kernel: GroupedKernel | None = None) -> None:
        self._kernel = kernel
        self._stacked: list[int] | None = None  # ids of the adapters in torch's stacks, in slot order
        self._loras: list[LinearLora | None] = []
        self.append(row_loras)

    def can_append(self, row_loras: Sequence[LinearLora | None]) -> bool:
        return all(lo is None or lo.bias is None for lo in row_loras)

    def append(self, row_loras: Sequence[LinearLora | None]) -> None:
        self._loras += list(row_loras)
        self._regroup()

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> None:
        for dst, src in moves:
            self._loras[dst] = self._loras[src]
        del self._loras[rows:]
        self._regroup()

    def _regroup(self) -> None:
        distinct = {id(lo): lo for lo in self._loras if lo is not None}
        slot = {key: k for k, key in enumerate(distinct)}
        members: list[list[int]] = [[] for _ in distinct]
        for row, lo in enumerate(self._loras):
            if lo is not None:
                members[slot[id(lo)]].append(row)
        self._distinct, self._members = list(distinct.values()), members
        self.native = self._kernel is not None and all(takes(lo) for lo in self._distinct)
        self.segments = Segments.of(self._distinct, members) if self.native and members else None
        self._native_lora = self._kernel.native_lora(self.segments) if self.native else None  # type: ignore[union-attr]
        self._torch_ready = False  # torch's indices (and stacks, if the adapters changed) when first needed

    def _ready_torch(self) -> None:
        if [id(lo) for lo in self._distinct] != self._stacked:
            self._stack(self._distinct)
        members = self._members
        width = max((len(m) for m in members), default=0)
        # (K, M): each slot's rows, padded by repeating its first row; valid (V,): positions kept, rows (V,)
        self.index = torch.tensor([m + [m[0]] * (width - len(m)) for m in members], device=self.At.device)
        self.valid = torch.tensor(
            [k * width + j for k, m in enumerate(members) for j in range(len(m))], device=self.At.device
        )
        self.rows = self.index.view(-1).index_select(0, self.valid)
        self.padded = self.valid.numel() != self.index.numel()
        self._torch_ready = True

    def _stack(self, distinct: list[LinearLora]) -> None:
        r_max = max(lo.rank for lo in distinct)
        self.dtype = common_dtype([lo.At for lo in distinct])
        padded = [padded_rank(lo, r_max, self.dtype) for lo in distinct]
        self.At = torch.stack([lo.At for lo in padded])  # (K, in, r)
        self.Bt = torch.stack([lo.Bt * lo.scaling for lo in padded])  # (K, r, out), scaling folded in
        self._stacked = [id(lo) for lo in distinct]

    def adds_into(self, x: Tensor) -> bool:
        """With the native kernel, for a decode step's fp32 rows (unit column stride)."""
        return self.native and decode_input(x, torch.float32) and x.stride(-1) == 1

    def add_into(self, x: Tensor, out: Tensor) -> None:
        if self._members:  # else no row has this module's LoRA
            self._kernel.add(out, x.view(x.shape[0], x.shape[-1]), self.segments)  # type: ignore[union-attr,arg-type]

    def native_lora(self, rows: int) -> NativeLora | None:
        """The kernel's call for this batch's segments (one adding nothing when no row has this module's LoRA)."""
        return self._native_lora

    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        out = base_layer(x, *args, **kwargs)  # (N, T, out)
        if not self._members:  # no row has this module's LoRA
            return out
        if self.adds_into(x) and out.dtype is torch.float32 and out.is_contiguous():
            self.add_into(x, out.view(out.shape[0], -1))  # the kernel's add, in place
            return out
        if not self._torch_ready:
            self._ready_torch()
        k, m = self.index.shape
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.dtype)  # (N, T, in)
        tokens = x3.shape[1]
        grouped = x3.index_select(0, self.index.view(-1)).view(k, m * tokens, -1)  # (K, M*T, in)
        delta = torch.bmm(torch.bmm(grouped, self.At), self.Bt).view(k * m, tokens, -1)  # (K*M, T, out)
        if self.padded:
            delta = delta.index_select(0, self.valid)  # (V, T, out)
        if out.dtype == self.dtype and not out.requires_grad and out.is_contiguous():
            out.view(out.shape[0], tokens, -1).index_add_(0, self.rows, delta)  # in place into the fresh output
            return out
        full = delta.new_zeros(out.shape[0], tokens, delta.shape[-1]).index_add_(0, self.rows, delta)
        return (out + full.view(out.shape)).to(out.dtype)  # PEFT: added in the LoRA dtype, cast once
