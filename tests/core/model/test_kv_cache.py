"""GrowableCache: the same attention inputs as transformers' DynamicCache, without copying the cache each step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from loramux.core.model.kv_cache import MIN_SPARE, GrowableCache, GrowableLayer, buffer_columns
from tests.conftest import build_base, input_ids


def decode(model, cache, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill ids, then feed back the greedy token for ``steps`` steps; the logits of every forward."""
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_decoding_matches_dynamic_cache(arch: str) -> None:
    model = build_base(arch)
    ids = input_ids(3, seq_len=5)
    expected = decode(model, DynamicCache(), ids, steps=MIN_SPARE + 8)  # past the first regrowth
    got = decode(model, GrowableCache(), ids, steps=MIN_SPARE + 8)  # past the first regrowth
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), f"step {step}"


def test_steps_write_in_place_and_buffers_grow_rarely() -> None:
    layer = GrowableLayer()
    rows, heads, dim = 2, 3, 4
    buffers = []  # the buffer's address at each step where it changed (a set would merge a reused address)
    written = []
    for step in range(100):
        new = torch.full((rows, heads, 1, dim), float(step))
        keys, values = layer.update(new, -new)
        written.append(float(step))
        if not buffers or buffers[-1] != keys.data_ptr():
            buffers.append(keys.data_ptr())
        assert keys.shape == (rows, heads, step + 1, dim)
        assert keys[0, 0, :, 0].tolist() == written and values[1, 2, :, 3].tolist() == [-w for w in written]
    regrowths, capacity = 0, 0  # what buffer_columns promises: MIN_SPARE of room while short, then a quarter
    for needed in range(1, 101):
        if needed > capacity:
            regrowths, capacity = regrowths + 1, buffer_columns(needed)
    assert len(buffers) == regrowths <= 6  # 100 tokens: a handful of regrowths, not one copy per step


def test_replaced_keys_are_adopted_at_the_next_update() -> None:
    """kv_batch replaces keys/values when rows join or leave; the next update must build on the new tensors."""
    layer = GrowableLayer()
    layer.update(torch.arange(2 * 4.0).view(2, 1, 4, 1), torch.zeros(2, 1, 4, 1))
    layer.keys, layer.values = layer.keys[1:, :, 2:], layer.values[1:, :, 2:]  # keep row 1, drop two columns

    keys, _ = layer.update(torch.full((1, 1, 1, 1), 9.0), torch.ones(1, 1, 1, 1))

    assert keys[0, 0, :, 0].tolist() == [6.0, 7.0, 9.0]


def test_crop_then_update_overwrites_the_dropped_tokens() -> None:
    layer = GrowableLayer()
    layer.update(torch.arange(5.0).view(1, 1, 5, 1), torch.zeros(1, 1, 5, 1))
    layer.crop(-2)
    keys, _ = layer.update(torch.full((1, 1, 1, 1), 7.0), torch.zeros(1, 1, 1, 1))
    assert keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 7.0]


def layer_with(keys: torch.Tensor) -> GrowableLayer:
    layer = GrowableLayer()
    layer.update(keys, -keys)
    return layer


def rows_of(n: int, length: int) -> torch.Tensor:
    """(n, 1, length, 1): row i holds i*100 + column."""
    return (torch.arange(n).view(n, 1, 1, 1) * 100 + torch.arange(length).view(1, 1, length, 1)).float()


def test_rows_leave_in_place_copying_only_the_moved_rows() -> None:
    layer = layer_with(rows_of(5, 4))
    buffer = layer.keys.data_ptr()
    assert layer.keep_rows([(1, 4)], rows=3, drop_front=1)  # rows 1 and 3 left: row 4 fills hole 1
    assert layer.keys.data_ptr() != buffer  # a view one column further on
    assert layer.keys[:, 0, :, 0].tolist() == [[1, 2, 3], [401, 402, 403], [201, 202, 203]]
    assert torch.equal(layer.values, -layer.keys)
    keys, _ = layer.update(torch.full((3, 1, 1, 1), 9.0), torch.zeros(3, 1, 1, 1))
    assert keys[:, 0, :, 0].tolist() == [[1, 2, 3, 9], [401, 402, 403, 9], [201, 202, 203, 9]]


def test_overlapping_moves_are_refused() -> None:
    layer = layer_with(rows_of(3, 2))
    assert not layer.keep_rows([(0, 1), (1, 0)], rows=2, drop_front=0)  # a swap would clobber row 0
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 1], [100, 101], [200, 201]]


def test_select_rows_in_any_order_and_merge_left_pads_with_zeros() -> None:
    from loramux.core.model.kv_batch import merge, select_rows

    cache_a, cache_b = GrowableCache(), GrowableCache()
    cache_a.update(rows_of(3, 2), -rows_of(3, 2), 0)
    cache_b.update(rows_of(1, 4) + 1000, -rows_of(1, 4), 0)
    mask = merge(cache_a, torch.ones(3, 2, dtype=torch.long), cache_b, torch.ones(1, 4, dtype=torch.long))
    keys = cache_a.layers[0].keys
    assert mask.tolist() == [[0, 0, 1, 1]] * 3 + [[1, 1, 1, 1]]
    assert keys[:, 0, :, 0].tolist() == [[0, 0, 0, 1], [0, 0, 100, 101], [0, 0, 200, 201], [1000, 1001, 1002, 1003]]
    grown, _ = cache_a.update(torch.zeros(4, 1, 1, 1), torch.zeros(4, 1, 1, 1), 0)
    assert grown.data_ptr() == keys.data_ptr()  # merged with room to grow: no copy at the next step
    mask = select_rows(cache_a, torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1), [2, 0])  # any order
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]]  # the long row left: its two leading columns too
    assert cache_a.layers[0].keys[:, 0, :, 0].tolist() == [[200, 201, 0], [0, 1, 0]]


def merged(cache_a: GrowableCache, rows_a: int, cache_b: GrowableCache) -> torch.Tensor:
    from loramux.core.model.kv_batch import merge

    width_a, (n_b, width_b) = cache_a.layers[0].keys.shape[-2], cache_b.layers[0].keys.shape[::2]
    mask_a = torch.ones(rows_a, width_a, dtype=torch.long)
    return merge(cache_a, mask_a, cache_b, torch.ones(n_b, width_b, dtype=torch.long))


def cache_of(states: torch.Tensor) -> GrowableCache:
    cache = GrowableCache()
    cache.update(states, -states, 0)
    return cache


def test_a_joining_row_shorter_than_the_batch_is_left_padded_in_place() -> None:
    cache = cache_of(rows_of(3, 4))
    layer = cache.layers[0]
    buffer = layer._key_buffer.data_ptr()
    assert layer.keep_rows([], rows=2, drop_front=0)  # row 2 left: its room stays
    mask = merged(cache, 2, cache_of(rows_of(1, 2) + 1000))
    assert layer._key_buffer.data_ptr() == buffer  # in place: the staying rows were not copied
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 1, 2, 3], [100, 101, 102, 103], [0, 0, 1000, 1001]]
    assert torch.equal(layer.values[:2], -layer.keys[:2]) and layer.values[2, 0, :, 0].tolist() == [0, 0, -1000, -1001]
    keys, _ = cache.update(torch.full((3, 1, 1, 1), 9.0), torch.zeros(3, 1, 1, 1), 0)  # decoding goes on in place
    assert keys.data_ptr() == layer._key_buffer.data_ptr() and keys[:, 0, -1, 0].tolist() == [9, 9, 9]


def test_a_joining_row_longer_than_the_batch_extends_it_into_dropped_columns() -> None:
    cache = cache_of(rows_of(3, 5))
    layer = cache.layers[0]
    buffer = layer._key_buffer.data_ptr()
    assert layer.keep_rows([(0, 2)], rows=1, drop_front=3)  # row 2 moved to 0; 3 leading columns dropped
    assert layer.keys[:, 0, :, 0].tolist() == [[203, 204]]
    mask = merged(cache, 1, cache_of(rows_of(2, 4) + 1000))  # 4 > 2 columns: 2 of the dropped 3 come back
    assert layer._key_buffer.data_ptr() == buffer
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 203, 204], [1000, 1001, 1002, 1003], [1100, 1101, 1102, 1103]]


def test_without_room_rows_join_by_one_copy_into_a_new_buffer() -> None:
    cache = cache_of(rows_of(2, 3))
    layer = cache.layers[0]
    buffer = layer._key_buffer.data_ptr()
    mask = merged(cache, 2, cache_of(rows_of(1, 5) + 1000))  # no spare row, and no dropped columns either
    assert layer._key_buffer.data_ptr() != buffer
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 100, 101, 102], [1000, 1001, 1002, 1003, 1004]]
    wide = cache_of(rows_of(3, 3))
    assert wide.layers[0].keep_rows([], rows=2, drop_front=0)
    assert not wide.layers[0].append_rows(rows_of(1, 4), rows_of(1, 4))  # a spare row, but no column on the left
    assert wide.layers[0].keys.shape == (2, 1, 3, 1)  # nothing changed


def test_a_merge_uses_up_the_joining_cache_layer_by_layer(monkeypatch) -> None:
    """The joining group's buffers go back as each layer is copied: the batch's KV arena holds the merged
    buffers plus one layer's old ones at a time, not the joining cache and the old batch beside the new."""
    from loramux.core import memory
    from loramux.core.memory import BufferArena

    monkeypatch.setattr(memory, "MIN_MAPPED_BYTES", 1)
    arena = BufferArena(max_bytes=1 << 22)
    layers = 4
    cache_a, cache_b = GrowableCache(arena=arena), GrowableCache(arena=arena)
    for i in range(layers):
        cache_a.update(rows_of(2, 3), -rows_of(2, 3), i)
        cache_b.update(rows_of(2, 5) + 1000, -rows_of(2, 5), i)
    lent_during: list[int] = []
    real_adopt = GrowableLayer.adopt

    def adopt(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        lent_during.append(arena.stats().lent_bytes // memory.PAGE)  # each buffer here is one page
        return real_adopt(self, *args, **kwargs)

    monkeypatch.setattr(GrowableLayer, "adopt", adopt)
    merged(cache_a, 2, cache_b)
    assert all(layer.keys is None and layer._key_buffer is None for layer in cache_b.layers)
    assert cache_a.layers[-1].keys[:, 0, :, 0].tolist()[2] == [1000, 1001, 1002, 1003, 1004]
    # layer i about to adopt its two new buffers: the old and joining ones of layers < i went (kept, the
    # count would stay at 4 * layers + 2)
    assert lent_during == [4 * (layers - i) + 2 * i + 2 for i in range(layers)]


def test_a_batch_of_level_width_shifts_left_in_its_buffers_instead_of_regrowing() -> None:
    """Rows leave taking leading columns with them while the others decode: when the buffer fills up on the
    right, its tokens move back to column 0 in the same buffer (no new allocation), and every row's keys and
    values stay exactly what was written."""
    layer = layer_with(rows_of(2, MIN_SPARE))  # capacity MIN_SPARE + MIN_SPARE columns
    buffer, capacity = layer._key_buffer, layer._key_buffer.shape[-2]
    expected = rows_of(2, MIN_SPARE)
    for step in range(3 * capacity):  # several times around the buffer
        token = torch.full((2, 1, 1, 1), 10_000.0 + step)
        layer.update(token, -token)
        expected = torch.cat([expected, token], dim=2)
        assert layer.keep_rows([], rows=2, drop_front=1)  # the oldest column left with a row
        expected = expected[:, :, 1:]
        assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected), step
    assert layer._key_buffer is buffer and layer._key_buffer.shape[-2] == capacity  # never reallocated


def test_a_growing_batch_still_regrows_when_shifting_would_leave_too_little_room() -> None:
    layer = layer_with(rows_of(1, MIN_SPARE))
    buffer = layer._key_buffer
    assert layer.keep_rows([], rows=1, drop_front=2)
    for step in range(MIN_SPARE + 2):  # width grows past what the buffer can hold with a quarter of room
        token = torch.full((1, 1, 1, 1), float(step))
        layer.update(token, -token)
    assert layer._key_buffer is not buffer
    assert layer.keys[0, 0, :, 0].tolist() == [*range(2, MIN_SPARE), *map(float, range(MIN_SPARE + 2))]
