"""Batch bookkeeping for continuous batching over a transformers KV cache: small pure functions.

The running batch is left-padded: every row's tokens end at the last column, and ``mask`` (N, S) marks real
tokens with 1. Rows join by merging a freshly prefilled cache (padding the shorter one on the left; one copy
of each into a buffer with room to grow) and leave by selecting the remaining rows in place (only the rows
moved into the holes are copied), after which columns that are padding in every row are dropped. Positions
are explicit (``mask.sum``), so padding never shifts a row's rotary or absolute positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from loramux.core.model.kv_cache import GrowableLayer, left_padded_buffer


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists -> ids (N, T) and mask (N, T), right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def prefill_positions(mask: Tensor) -> Tensor:
    """(N, T) position of each token within its own row; padding gets 0 (it is masked anyway)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def next_positions(mask: Tensor) -> Tensor:
    """(N, 1) position of the token each row feeds next: how many real tokens it has so far."""
    return mask.sum(dim=1, keepdim=True)


def _layers(cache: DynamicCache) -> list[GrowableLayer]:
    """The cache's per-layer key/value holders; continuous batching needs GrowableLayers (kv_cache.py)."""
    layers = list(cache.layers)
    for layer in layers:
        if not isinstance(layer, GrowableLayer) or layer.keys is None or layer.values is None:
            raise TypeError(f"continuous batching needs a GrowableCache, got {type(layer).__name__} layers")
    return layers  # type: ignore[return-value]


def _kv(layer: GrowableLayer) -> tuple[Tensor, Tensor]:
    keys, values = layer.keys, layer.values
    assert keys is not None and values is not None  # checked by _layers
    return keys, values


def merge(cache_a: DynamicCache, mask_a: Tensor, cache_b: DynamicCache, mask_b: Tensor) -> Tensor:
    """Append cache_b's rows to cache_a in place: into the room cache_a's buffers have (only cache_b's rows are
    copied), else one copy of each into a new buffer with room to grow; returns the merged mask (N_a + N_b, S).
    cache_b is used up: each of its layers lets go of its buffers once copied (a joining group's cache and the
    batch's old buffers beside the merged ones, every layer at once, were the KV arena's high-water mark)."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    extra_a, extra_b = width - mask_a.shape[1], width - mask_b.shape[1]
    rows = mask_a.shape[0] + mask_b.shape[0]
    for layer_a, layer_b in zip(_layers(cache_a), _layers(cache_b), strict=True):
        (keys_a, values_a), (keys_b, values_b) = _kv(layer_a), _kv(layer_b)
        if not (keys_a.shape[-2] == mask_a.shape[1] and layer_a.append_rows(keys_b, values_b)):
            layer_a.adopt(
                left_padded_buffer([keys_a, keys_b], width, arena=layer_a.arena),
                left_padded_buffer([values_a, values_b], width, arena=layer_a.arena),
                rows=rows,
                length=width,
            )
        del keys_a, values_a, keys_b, values_b  # the old views: this layer's old buffers can go now
        layer_b.let_go()
    return torch.cat([F.pad(mask_a, (extra_a, 0)), F.pad(mask_b, (extra_b, 0))])


def select_rows(cache: DynamicCache, mask: Tensor, keep: Sequence[int]) -> Tensor:
    """Keep only rows ``keep`` (in that order) in place; drop all-padding columns. Returns the new mask.

    When ``keep`` is what swap-remove produces (rows stay put, the last ones fill the holes), only the moved
    rows are copied; any other order copies the kept rows."""
    index = torch.tensor(list(keep), dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    first = int(mask.any(dim=0).long().argmax()) if mask.numel() else 0  # first column some row uses
    moves = [(dst, src) for dst, src in enumerate(keep) if dst != src]
    for layer in _layers(cache):
        if not layer.keep_rows(moves, len(keep), first):
            keys, values = _kv(layer)
            layer.keys = keys.index_select(0, index)[:, :, first:]
            layer.values = values.index_select(0, index)[:, :, first:]
    return mask[:, first:]
