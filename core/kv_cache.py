"""A transformers KV cache whose layers grow in place: decode steps write into spare capacity.

transformers' ``DynamicLayer`` concatenates every new token onto its keys and values, which copies the whole
cache each step: at 8 rows and ~100 tokens that is 10% of a decode step on CPU (BENCHMARKS.md). A
``GrowableLayer`` keeps keys and values as views of a larger buffer and copies only when the buffer is full,
growing it by a quarter (at least ``MIN_SPARE`` tokens), so a step's cost no longer grows with the context.

``keys``/``values`` stay the layer's source of truth, as in ``DynamicLayer``: code that replaces them (the
batch bookkeeping in ``kv_batch`` when rows join or leave, transformers' ``crop`` or beam reordering) simply
makes the next update move them into a fresh buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 32  # tokens of room added when a buffer grows


def _capacity(needed: int) -> int:
    return needed + max(MIN_SPARE, needed // 4)


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys and values (N, H, S, D) are prefix views of buffers (N, H, capacity, D)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._holds_views(key_states, length + new):
            self._regrow(key_states, value_states, length, _capacity(length + new))
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, length : length + new].copy_(key_states)
        self._value_buffer[:, :, length : length + new].copy_(value_states)
        self.keys = self._key_buffer[:, :, : length + new]
        self.values = self._value_buffer[:, :, : length + new]
        return self.keys, self.values

    def _holds_views(self, key_states: Tensor, needed: int) -> bool:
        """Are keys/values still the prefix views of our buffers, with room for ``needed`` tokens?"""
        kb, vb, keys, values = self._key_buffer, self._value_buffer, self.keys, self.values
        if kb is None or vb is None or keys is None or values is None or keys.numel() == 0:
            return False
        return (
            needed <= kb.shape[-2]
            and keys.data_ptr() == kb.data_ptr()
            and values.data_ptr() == vb.data_ptr()
            and keys.shape[:2] == kb.shape[:2] == key_states.shape[:2]
            and keys.stride() == kb.stride()
            and values.stride() == vb.stride()
        )

    def _regrow(self, key_states: Tensor, value_states: Tensor, length: int, capacity: int) -> None:
        self._key_buffer = _buffer_with(self.keys, key_states, length, capacity)
        self._value_buffer = _buffer_with(self.values, value_states, length, capacity)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def _buffer_with(current: Tensor | None, states: Tensor, length: int, capacity: int) -> Tensor:
    """A new (N, H, capacity, D) buffer holding ``current``'s first ``length`` tokens."""
    rows, heads, _, dim = states.shape
    buffer = torch.empty((rows, heads, capacity, dim), dtype=states.dtype, device=states.device)
    if length:
        assert current is not None
        buffer[:, :, :length].copy_(current)
    return buffer


class GrowableCache(DynamicCache):
    """A DynamicCache of GrowableLayers (created lazily, one per attention layer, like DynamicCache's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowableLayer
