"""The gathered LoRA route: per-row A/B stacks, one bmm and one fused baddbmm per step (distinct adapters).

Each row's adapter weights are copied into per-row stacks when the row joins (``append`` writes only its
slices) and moved when rows leave (``compact`` moves only the tail rows), so a step reads one adapter's worth
of weights per row in two batched matmuls. bench/lora_routing.py measured it against a loop over adapters
(PEFT's mixed batch) and one wide masked matmul over stacked adapters; it won wherever rows use distinct
adapters (BENCHMARKS.md). Rows without the module's LoRA get zero weights, adding exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loramux.core.lora.route import Route, add_delta, move_rows
from loramux.core.lora.weights import LinearLora, common_dtype, padded_rank
from loramux.core.lora.workspace import Buffers, RoutingWorkspace


def _stack_into(dst: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """dst (k, ...) = stack(tensors), with no temporary unless autograd must see it (trainable adapters)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return dst.copy_(torch.stack(list(tensors)))
    return torch.stack(list(tensors), out=dst)


class GatheredLinear(Route):
    """Rows without this module's LoRA get zero weights, which adds exactly 0.

    The stacks live in buffers with spare capacity (doubling), so rows join by writing their own slices and
    leave by moving the last rows into their places: neither copies the other rows.
    """

    def __init__(
        self, row_loras: Sequence[LinearLora | None], *, workspace: RoutingWorkspace | None = None, name: str = ""
    ) -> None:
        present = [lo for lo in row_loras if lo is not None]
        self.r_max = max(lo.rank for lo in present)
        self.dtype = common_dtype([lo.At for lo in present])
        self.has_bias = any(lo.bias is not None for lo in present)
        self.n = 0
        ref = present[0]
        self._zero = LinearLora(
            ref.At.new_zeros(ref.At.shape[0], self.r_max, dtype=self.dtype),
            ref.Bt.new_zeros(self.r_max, ref.Bt.shape[1], dtype=self.dtype),
            None,
            0.0,
        )
        self._workspace, self._name = workspace, name  # where its buffers come from and go back to, if any
        in_features, out_features = ref.At.shape[0], ref.Bt.shape[1]
        self._like: Buffers = (  # empty templates: the buffers' shapes past the row dimension, and dtype
            self._zero.At.new_empty(0, in_features, self.r_max),
            self._zero.Bt.new_empty(0, self.r_max, out_features),
            self._zero.Bt.new_empty(0, 1, out_features) if self.has_bias else None,
        )
        self._bufs: Buffers | None = None
        self.append(row_loras)

    def can_append(self, row_loras: Sequence[LinearLora | None]) -> bool:
        present = [lo for lo in row_loras if lo is not None]
        return all(
            lo.rank <= self.r_max and lo.At.dtype == self.dtype and (lo.bias is None or self.has_bias) for lo in present
        )

    def append(self, row_loras: Sequence[LinearLora | None]) -> None:
        """Rows join at the end (callers check can_append first), written straight into the buffers."""
        rows = [padded_rank(lo, self.r_max, self.dtype) if lo is not None else self._zero for lo in row_loras]
        k, n = len(rows), self.n
        self._reserve(n + k)
        assert self._bufs is not None
        at, bt, bias = self._bufs
        scaling = torch.tensor([lo.scaling for lo in rows], dtype=self.dtype, device=self._zero.At.device)  # (k,)
        # (k, in, r) and (k, r, out), LinearLora's own layout: plain copies, and contiguous bmm operands
        # (measured faster than transposed views)
        _stack_into(at[n : n + k], [lo.At for lo in rows])  # (k, in, r_max)
        _stack_into(bt[n : n + k], [lo.Bt for lo in rows]).mul_(scaling[:, None, None])  # (k, r_max, out)
        if bias is not None:
            no_bias = self._zero.Bt.new_zeros(self._zero.Bt.shape[1])
            biases = [lo.bias if lo.bias is not None else no_bias for lo in rows]
            bias[n : n + k] = (torch.stack(biases).to(self.dtype) * scaling[:, None]).unsqueeze(1)  # (k, 1, out)
        self.n += k
        self._refresh_views()

    def release(self) -> None:
        """The plan holding this route is dropped: its buffers go back to the workspace (it is not used again)."""
        if self._workspace is not None and self._bufs is not None:
            self._workspace.give(self._name, self._bufs)
        self._bufs = None

    def _reserve(self, rows: int) -> None:
        capacity = 0 if self._bufs is None else self._bufs[0].shape[0]
        if rows <= capacity:
            return
        like = self._like
        if self._workspace is not None:
            grown = self._workspace.take(self._name, like, rows=rows)
        else:  # a new plan (a prefill's) gets exactly its rows; joins then double, so they seldom regrow
            capacity = rows if self._bufs is None else max(1 << (rows - 1).bit_length(), 2 * capacity)
            grown = tuple(t.new_empty(capacity, *t.shape[1:]) if t is not None else None for t in like)  # type: ignore[assignment]
        if self._bufs is not None:
            for old, buf in zip(self._bufs, grown, strict=True):
                if old is not None and buf is not None:
                    buf[: self.n] = old[: self.n]
        self._bufs = grown

    def _refresh_views(self) -> None:
        assert self._bufs is not None
        at, bt, bias = self._bufs
        self.At, self.Bt = at[: self.n], bt[: self.n]  # (N, in, r_max), (N, r_max, out)
        self.bias = bias[: self.n] if bias is not None else None  # (N, 1, out)

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> None:
        assert self._bufs is not None
        for buf in self._bufs:
            if buf is not None:
                move_rows(buf, moves, rows)
        self.n = rows
        self._refresh_views()

    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        out = base_layer(x, *args, **kwargs)
        if x.dim() == 3 and out.dim() == 3 and x.dtype is out.dtype is self.At.dtype and self.bias is None:
            h = torch.bmm(x, self.At)  # the hot path: (N, T, r_max), no reshapes
            if out.requires_grad:
                return torch.baddbmm(out, h, self.Bt)
            # in place into the base output (a fresh tensor): not allocating another (N, T, out) made the
            # expand of 56 modules at 8 decode rows 0.35 ms instead of 0.46 ms. No add_into: added into a
            # fused GEMM's column slice (strided) instead of its own copy it ran no faster (8 rows, 8 adapters)
            return out.baddbmm_(h, self.Bt)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.At.dtype)  # (N, T, in)
        h = torch.bmm(x3, self.At)  # (N, T, r_max)
        if out.dtype == h.dtype and self.bias is None:  # fused add: out + h @ Bt
            return torch.baddbmm(out.reshape(h.shape[0], h.shape[1], -1), h, self.Bt).view(out.shape)
        delta = torch.bmm(h, self.Bt) if self.bias is None else torch.baddbmm(self.bias, h, self.Bt)
        return add_delta(out, delta.reshape(*out.shape))
