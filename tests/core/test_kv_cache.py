"""GrowableCache: the same attention inputs as transformers' DynamicCache, without copying the cache each step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from core.kv_cache import MIN_SPARE, GrowableCache, GrowableLayer
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
    buffers = set()
    written = []
    for step in range(100):
        new = torch.full((rows, heads, 1, dim), float(step))
        keys, values = layer.update(new, -new)
        written.append(float(step))
        buffers.add(keys.data_ptr())
        assert keys.shape == (rows, heads, step + 1, dim)
        assert keys[0, 0, :, 0].tolist() == written and values[1, 2, :, 3].tolist() == [-w for w in written]
    assert len(buffers) <= 4  # 100 tokens: a handful of regrowths, not one copy per step


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
