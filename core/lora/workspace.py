"""Where the gathered route's per-row stacks live between batches: one set of buffers per module, kept.

A decode batch's gathered stacks hold one adapter's worth of weights per row, (rows, in, r) and (rows, r, out)
per module: at 32 rows of r=16 adapters on the bench's model, 152 MiB. Allocated per batch, they came from
fresh pages each time (page faults on every join that regrew them) and went back to the allocator when the
batch emptied, so a server's memory swung by that much with its load, on top of its adapters. The engine
keeps them instead: the decode plan leases each module's buffers here, sized for the engine's largest batch
(``rows``), and gives them back when the plan is dropped; the next plan takes the same memory. The footprint
is then fixed, max_batch_rows rows of stacks per module at the largest rank served, resident (zeroed) from
the first batch that routes on it (what `make bench-scale` counts as the server's base).

A lease is exclusive: ``take`` hands a module's buffers to one route and forgets them until ``give``. Only
the engine's decode plan uses a workspace (prefill plans are short-lived and small); engine thread only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from loramux.core.lora.native_kernel import GroupedKernel

Buffers = tuple[Tensor, Tensor, Tensor | None]  # At (C, in, r), Bt (C, r, out), bias (C, 1, out) or None


class RoutingWorkspace:
    def __init__(self, *, rows: int, grouped_kernel: GroupedKernel | None = None) -> None:
        if rows < 1:
            raise ValueError(f"a routing workspace needs rows >= 1 ({rows})")
        self.grouped_kernel = grouped_kernel  # the decode plan's grouped routes run it (--lora-kernel)
        self.rows = rows  # the capacity a leased set is allocated with: the engine's max_batch_rows
        self._spare: dict[str, Buffers] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers held now (not leased)."""
        return sum(t.nbytes for bufs in self._spare.values() for t in bufs if t is not None)

    def take(self, name: str, like: Buffers, *, rows: int) -> Buffers:
        """Buffers for module ``name`` shaped like ``like`` past their first dimension, with room for at least
        ``rows`` rows: the ones kept for it when they fit, else new ones (the kept ones are then dropped)."""
        kept = self._spare.pop(name, None)
        if kept is not None and _fits(kept, like, rows=rows):
            return kept
        capacity = max(rows, self.rows)
        # zeroed, so every page is resident from the first use: the footprint is fixed, not growing with the
        # most rows a batch has had so far
        return tuple(t.new_zeros(capacity, *t.shape[1:]) if t is not None else None for t in like)  # type: ignore[return-value]

    def give(self, name: str, buffers: Buffers) -> None:
        """Keep ``buffers`` for the next route of module ``name`` (the giver must not use them again)."""
        self._spare[name] = buffers


def _fits(kept: Buffers, like: Sequence[Tensor | None], *, rows: int) -> bool:
    def fits(k: Tensor | None, t: Tensor | None) -> bool:
        if k is None or t is None:
            return k is t
        return k.shape[0] >= rows and k.shape[1:] == t.shape[1:] and k.dtype == t.dtype and k.device == t.device

    return all(fits(k, t) for k, t in zip(kept, like, strict=True))
