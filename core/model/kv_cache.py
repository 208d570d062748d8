"""A transformers KV cache whose layers grow in place: decode steps write into spare capacity.

transformers' ``DynamicLayer`` concatenates every new token onto its keys and values, which copies the whole
cache each step: at 8 rows and ~100 tokens that is 10% of a decode step on CPU (BENCHMARKS.md). A
``GrowableLayer`` keeps keys and values as views of a larger buffer and copies only when the buffer is full,
growing it by a quarter (at least ``MIN_SPARE`` tokens), so a step's cost no longer grows with the context.

Rows leaving the batch are handled in place (``keep_rows``: only the rows moved into the holes are copied,
and leading all-padding columns are dropped by moving a start offset); rows joining are written into the room
the buffers have (``append_rows``: the room rows that left keep), else once into a new buffer with room to
grow (``left_padded_buffer`` + ``adopt``). ``keys``/``values`` stay the layer's
source of truth, as in ``DynamicLayer``: code that replaces them (transformers' ``crop`` or beam reordering)
simply makes the next update move them into a fresh buffer. A cache given a ``BufferArena`` takes every buffer
from it (``loramux.core.memory``: the engine's, so a batch reuses the pages of the one before); without one,
the buffers a batch regrows or rebuilds into are mappings of their own, and a prefill's first is the heap's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loramux.core.memory import BufferArena, mapped_empty

# tokens of room added when a short buffer grows (a quarter from 64 tokens on). It is paid for every row of a
# left-padded batch whose rows joined at different steps: at 32 rows of 32+32 tokens, 32 columns of room made
# the batch's KV 93 MiB where an aligned batch's is 64 (bench.scale); regrowing a short cache is a small copy
MIN_SPARE = 16


def buffer_columns(needed: int) -> int:
    """Token positions a buffer holding ``needed`` gets: a quarter more, at least MIN_SPARE (the KV budget
    counts this, not ``needed``)."""
    return needed + max(MIN_SPARE, needed // 4)


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys and values (N, H, S, D) are views ``buffer[:N, :, start:start + S]`` of buffers
    (R, H, capacity, D) with room to grow; ``kv_batch`` uses ``keep_rows`` and ``adopt`` for rows leaving and
    joining the batch without copying the rows that stay."""

    def __init__(self, *, arena: BufferArena | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arena = arena  # where its buffers come from (None: mapped_empty / torch.empty)
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None
        self._start = 0  # first buffer column in use

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = self.extend(key_states, value_states)
        new = key_states.shape[-2]
        keys[:, :, -new:].copy_(key_states)
        values[:, :, -new:].copy_(value_states)
        return keys, values

    def extend(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """``update`` but for its copies: keys and values (N, H, S + new, D) with room made (or found) for the
        new columns, which the caller writes (the native decode layers, in C). key_states and value_states
        (N, H, new, D) only give the shape, dtype and device."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._holds_views(key_states, length + new) and not self._shift_left(key_states, length + new):
            self._regrow(key_states, value_states, length, buffer_columns(length + new))
        self._set_views(key_states.shape[0], length + new)
        return self.keys, self.values  # type: ignore[return-value]

    def keep_rows(self, moves: Sequence[tuple[int, int]], rows: int, drop_front: int) -> bool:
        """In place: row dst takes row src for each (dst, src) in moves (src >= rows > dst), keep the first
        ``rows`` rows and drop ``drop_front`` leading columns. Only moved rows are copied. False (nothing done)
        when keys/values are not views of this layer's buffers or the moves could overlap."""
        keys = self.keys
        if keys is None or not self._holds_views(keys, keys.shape[-2]):
            return False
        if any(not dst < rows <= src for dst, src in moves):
            return False
        kb, vb, start, length = self._key_buffer, self._value_buffer, self._start, keys.shape[-2]
        assert kb is not None and vb is not None
        for buffer in (kb, vb):  # one plain copy per moved row (an indexed assignment was several times slower)
            for dst, src in moves:
                buffer[dst, :, start : start + length].copy_(buffer[src, :, start : start + length])
        self._start = start + drop_front
        self._set_views(rows, length - drop_front)
        return True

    def append_rows(self, key_states: Tensor, value_states: Tensor) -> bool:
        """In place: rows (n, H, S, D) join after the current rows, right-aligned with them (zeros on the left of
        the shorter side), written into room the buffers already have: the rows that stay are not copied (a
        rebuild copies every row; at 8 rows of 1,000 tokens that is 300 MB of fresh pages per join). False
        (nothing done) when keys/values are not views of this layer's buffers or there is no room: fewer spare
        rows than n, too few columns on the right for the longer length, or, when the new rows are longer than
        the current ones, too few dropped columns on the left to extend into."""
        keys, kb, vb = self.keys, self._key_buffer, self._value_buffer
        if keys is None or kb is None or vb is None or not self._holds_views(keys, keys.shape[-2]):
            return False
        rows, length = keys.shape[0], keys.shape[-2]
        n, new = key_states.shape[0], key_states.shape[-2]
        width = max(length, new)
        start = self._start - (width - length)  # the current rows gain width - length columns on the left
        fits = rows + n <= kb.shape[0] and start >= 0 and start + width <= kb.shape[-2]
        if not fits or key_states.shape[1] != kb.shape[1] or key_states.shape[3] != kb.shape[3]:
            return False
        if key_states.dtype != kb.dtype or key_states.device != kb.device:
            return False
        for buffer, states in ((kb, key_states), (vb, value_states)):
            buffer[:rows, :, start : self._start].zero_()  # padding is masked, but must be finite
            buffer[rows : rows + n, :, start : start + width - new].zero_()
            buffer[rows : rows + n, :, start + width - new : start + width].copy_(states)
        self._start = start
        self._set_views(rows + n, width)
        return True

    def let_go(self) -> None:
        """This layer's rows were copied into another cache (``kv_batch.merge``): its buffers go now, not when
        the cache object does, so a merge holds one layer's worth of them at a time, not every layer's."""
        self._key_buffer = self._value_buffer = None
        self.keys = self.values = None
        self._start = 0

    def adopt(self, key_buffer: Tensor, value_buffer: Tensor, *, rows: int, length: int) -> None:
        """Take over new buffers whose first ``length`` columns of the first ``rows`` rows hold the states."""
        self._key_buffer, self._value_buffer, self._start = key_buffer, value_buffer, 0
        self._set_views(rows, length)

    def _set_views(self, rows: int, length: int) -> None:
        kb, vb, start = self._key_buffer, self._value_buffer, self._start
        assert kb is not None and vb is not None
        self.keys = kb[:rows, :, start : start + length]
        self.values = vb[:rows, :, start : start + length]

    def _holds_views(self, key_states: Tensor, needed: int) -> bool:
        """Are keys/values still the views of our buffers, with room for ``needed`` tokens from ``start``?"""
        kb, vb, keys, values = self._key_buffer, self._value_buffer, self.keys, self.values
        if kb is None or vb is None or keys is None or values is None or keys.numel() == 0:
            return False
        offset = self._start * kb.stride(2) * kb.element_size()  # where column `start` of row 0 begins
        return (
            self._start + needed <= kb.shape[-2]
            and keys.shape[0] == key_states.shape[0] <= kb.shape[0]
            and keys.shape[1] == kb.shape[1] == key_states.shape[1]
            and keys.data_ptr() == kb.data_ptr() + offset
            and values.data_ptr() == vb.data_ptr() + offset
            and keys.stride() == kb.stride()
            and values.stride() == vb.stride()
        )

    def _shift_left(self, key_states: Tensor, needed: int) -> bool:
        """In place: the buffers are full on the right but have dropped columns on the left (rows that left
        took their padding with them): move the tokens to column 0, so a batch whose width stays level (rows
        joining as others leave) reuses its buffers instead of allocating new ones every few dozen steps. Only
        while that leaves at least half the room a regrowth would give (else regrow, as a growing batch must);
        False (nothing done) when it does not apply."""
        kb, vb, keys, start = self._key_buffer, self._value_buffer, self.keys, self._start
        if kb is None or vb is None or keys is None or start == 0:
            return False
        if kb.shape[-2] - needed < (buffer_columns(needed) - needed) // 2:
            return False
        length = keys.shape[-2]
        if not self._holds_views(key_states, length):  # the views are ours, with the rows the update writes
            return False
        rows = keys.shape[0]
        for buffer in (kb, vb):  # chunks of at most `start` columns: source and destination never overlap
            for col in range(0, length, start):
                width = min(start, length - col)
                buffer[:rows, :, col : col + width].copy_(buffer[:rows, :, start + col : start + col + width])
        self._start = 0
        self._set_views(rows, length)
        return True

    def _regrow(self, key_states: Tensor, value_states: Tensor, length: int, capacity: int) -> None:
        self._key_buffer = _buffer_with(self.keys, key_states, length, capacity, arena=self.arena)
        self._value_buffer = _buffer_with(self.values, value_states, length, capacity, arena=self.arena)
        self._start = 0

    def allocated_bytes(self) -> int:
        kb, vb = self._key_buffer, self._value_buffer
        if kb is None or vb is None:  # not grown yet: what the update left in keys/values
            kb, vb = self.keys, self.values
        return (kb.nbytes if kb is not None else 0) + (vb.nbytes if vb is not None else 0)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._start = 0
        super().reset()


def _buffer_with(
    current: Tensor | None, states: Tensor, length: int, capacity: int, *, arena: BufferArena | None
) -> Tensor:
    """A new (N, H, capacity, D) buffer holding ``current``'s first ``length`` tokens."""
    rows, heads, _, dim = states.shape
    # without an arena, a batch regrowing: mapped; a prefill's first: the heap's (reused warm)
    empty = arena.empty if arena is not None else mapped_empty if length else torch.empty
    buffer = empty((rows, heads, capacity, dim), dtype=states.dtype, device=states.device)
    if length:
        assert current is not None
        buffer[:, :, :length].copy_(current)
    return buffer


def left_padded_buffer(parts: Sequence[Tensor], width: int, *, arena: BufferArena | None = None) -> Tensor:
    """The rows of each part (n_i, H, S_i, D), right-aligned at ``width`` with zeros on the left, stacked in
    one new buffer (sum n_i, H, capacity, D) with room to grow: one copy of each part."""
    first = parts[0]
    rows, heads, dim = sum(p.shape[0] for p in parts), first.shape[1], first.shape[3]
    empty = arena.empty if arena is not None else mapped_empty
    buffer = empty((rows, heads, buffer_columns(width), dim), dtype=first.dtype, device=first.device)
    row = 0
    for part in parts:
        n, pad = part.shape[0], width - part.shape[2]
        buffer[row : row + n, :, :pad].zero_()  # padding is masked, but must be finite (0 x NaN is NaN)
        buffer[row : row + n, :, pad:width].copy_(part)
        row += n
    return buffer


class GrowableCache(DynamicCache):
    """A DynamicCache of GrowableLayers (created lazily, one per attention layer, like DynamicCache's own)."""

    def __init__(self, *, arena: BufferArena | None = None) -> None:
        super().__init__()
        self.arena = arena
        self.layer_class_to_replicate = partial(GrowableLayer, arena=arena)  # type: ignore[assignment]

    @classmethod
    def adopting(
        cls, buffers: Sequence[tuple[Tensor, Tensor]], *, rows: int, length: int, arena: BufferArena | None = None
    ) -> GrowableCache:
        """A cache whose layers take over these (keys, values) buffers (R, H, capacity, D), one pair per layer,
        the first ``length`` columns of the first ``rows`` rows holding states already (a cached prefix)."""
        cache = cls(arena=arena)
        for key_buffer, value_buffer in buffers:
            layer = GrowableLayer(arena=arena)
            layer.lazy_initialization(key_buffer, value_buffer)
            layer.adopt(key_buffer, value_buffer, rows=rows, length=length)
            cache.layers.append(layer)
        return cache

    def allocated_bytes(self) -> int:
        """Bytes held by every layer's buffers, spare room included (attribute reads only: safe from any thread)."""
        return sum(layer.allocated_bytes() for layer in list(self.layers) if isinstance(layer, GrowableLayer))

    def buffer_rows(self) -> int:
        """Rows the buffers hold: the batch's rows, plus those that left since the buffers were last allocated
        (their room is kept until the next regrow or merge)."""
        layers = [layer for layer in list(self.layers) if isinstance(layer, GrowableLayer)]
        buffer = layers[0]._key_buffer if layers else None
        keys = layers[0].keys if layers else None
        return int(buffer.shape[0]) if buffer is not None else int(keys.shape[0]) if keys is not None else 0
