"""A whole native decoder layer, attention over the KV cache included (native/decode_attention.c): the forward's
logits to fp32 rounding and its tokens with left padding, ragged runs narrower than the mask, grouped-query
heads and a context long enough for several threads; the cache's new column written as update would; and
where it does not run (a cache that is not growable, a mask that is not the cache's)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from loramux.core.model.decode_step import decode_step_for
from loramux.core.model.kv_batch import prefill_positions
from loramux.core.model.kv_cache import GrowableCache, GrowableLayer
from loramux.core.model.linear_kernels import LinearKernel
from loramux.core.model.native_layer_choice import attach_native_layers, within_tolerance
from loramux.core.model.native_layers import DecodeLayers, NativeDecodeLayers, native_layers
from tests.conftest import build_base
from tests.core.model.test_decode_step import decode_both, prepared

pytestmark = pytest.mark.skipif(
    isinstance(native_layers(build_base("llama")), str), reason="native decode layers cannot run on this machine"
)


def native_step(arch: str = "llama"):
    model = prepared(arch, LinearKernel.TORCH)
    step = decode_step_for(model)
    assert step is not None
    assert not isinstance(attach_native_layers(model, step, mode=DecodeLayers.NATIVE, rows=(4,)), str)
    return model, step


def whole_layers(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = NativeDecodeLayers.whole_layer
    monkeypatch.setattr(NativeDecodeLayers, "whole_layer", lambda s, i, *a: calls.append(i) or original(s, i, *a))
    return calls


def decode(model, step, prompts, *, steps, caches, segments=lambda i, lengths: None):
    """decode_both from these prompts and caches, without ragged runs unless segments gives them."""
    return decode_both(model, step, steps=steps, prompts=prompts, caches=caches, segments=segments)


def assert_close(pairs) -> None:
    for i, (want, got) in enumerate(pairs):
        assert within_tolerance(want, got), f"step {i}: differs by {(want - got).abs().max().item():.3g}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_whole_layer_gives_the_forwards_logits_with_padding_and_grouped_heads(arch, monkeypatch) -> None:
    model, step = native_step(arch)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query heads
    calls = whole_layers(monkeypatch)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    assert_close(decode(model, step, prompts, steps=4, caches=[GrowableCache(), GrowableCache()]))
    assert calls == [0, 1] * 4


def test_ragged_runs_narrower_than_the_mask_are_what_attention_reads(monkeypatch) -> None:
    model, step = native_step()
    calls = whole_layers(monkeypatch)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    # row 0 attends only its last 4 columns, fewer than its mask's (the probe's case); row 1 its last 7
    pairs = decode(model, step, prompts, steps=3, caches=[GrowableCache(), GrowableCache()],
                   segments=lambda i, lengths: [(0, 1, 4), (1, 2, 7)])  # fmt: skip
    assert_close(pairs)
    plain = decode(model, step, prompts, steps=1, caches=[GrowableCache(), GrowableCache()])
    assert not within_tolerance(plain[0][1], pairs[0][1])  # the runs changed what row 0 saw
    assert calls


def test_a_long_context_on_two_threads(monkeypatch) -> None:
    model, step = native_step()
    calls = whole_layers(monkeypatch)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 100, (n,), generator=generator).tolist() for n in (700, 450, 600)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 3 rows x 4 heads x 700 columns x 8: a team's worth of work (ATTEND_SERIAL_WORK)
    try:
        assert_close(decode(model, step, prompts, steps=3, caches=[GrowableCache(), GrowableCache()]))
    finally:
        torch.set_num_threads(threads)
    assert calls == [0, 1] * 3


def test_the_new_column_is_written_as_update_writes_it() -> None:
    model, step = native_step()
    prompts = [[5, 6, 7, 8], [9, 10]]
    native, torch_ops = GrowableCache(), GrowableCache()
    decode(model, step, prompts, steps=2, caches=[torch_ops, native])  # the forward writes torch_ops via update
    for ours, theirs in zip(native.layers, torch_ops.layers, strict=True):
        assert isinstance(ours, GrowableLayer)
        assert ours.keys.shape == theirs.keys.shape
        assert within_tolerance(theirs.keys, ours.keys) and within_tolerance(theirs.values, ours.values)


def test_a_cache_that_is_not_growable_keeps_torchs_attention(monkeypatch) -> None:
    model, step = native_step()
    calls = whole_layers(monkeypatch)
    pairs = decode(model, step, [[5, 6, 7], [8, 9]], steps=2, caches=[DynamicCache(), DynamicCache()])
    assert_close(pairs)
    assert calls == []  # the two native calls around torch's update and SDPA


def test_a_mask_that_is_not_the_caches_is_refused_before_the_cache_changes() -> None:
    model, step = native_step()
    cache = GrowableCache()
    mask = torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), attention_mask=mask,
              position_ids=prefill_positions(mask), past_key_values=cache)  # fmt: skip
        length = cache.get_seq_length()
        wrong = torch.ones(2, 5, dtype=torch.long)  # the cache would have 4 columns
        with pytest.raises(ValueError, match="mask"):
            step(torch.tensor([[1], [2]]), positions=torch.tensor([[3], [3]]), mask=wrong, cache=cache,
                 segments=None, routes={})  # fmt: skip
    assert cache.get_seq_length() == length
