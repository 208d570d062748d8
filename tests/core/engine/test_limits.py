"""The engine's limits: the model's context length, the KV memory budget, oversize text refused untokenized,
and one terminal event per stream when a forward pass fails."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from loramux.core import AdapterManager, Engine, EngineConfig, GenerationRequest, TokenDelta
from loramux.core.engine.kv_budget import KvBudget
from loramux.core.errors import CapacityExceededError, EngineFailure
from loramux.core.model.capacity import context_length, kv_bytes_per_token
from loramux.core.model.kv_cache import buffer_columns
from tests.generation_fixtures import collect

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def engine_for(model, tokenizer, **config) -> Engine:
    return Engine(model, tokenizer, AdapterManager(model), EngineConfig(**config))


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def test_context_length_comes_from_the_config(gpt2, base_model):
    assert context_length(gpt2) == 64
    assert context_length(base_model) == base_model.config.max_position_embeddings


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_request_past_the_positions_is_refused_and_its_neighbour_finishes(arch, gpt2, base_model, tokenizer):
    model = copy.deepcopy(gpt2 if arch == "gpt2" else base_model)
    positions = context_length(model)
    assert positions is not None
    limit = min(positions, 64)
    engine = engine_for(model, tokenizer, max_model_len=limit, default_max_new_tokens=8)
    try:
        neighbour = engine.submit(GenerationRequest(prompt=[5, 6, 7], max_new_tokens=40, ignore_eos=True))
        first = next(iter(neighbour))
        assert engine.limits.max_total_tokens == limit
        with pytest.raises(CapacityExceededError) as err:
            engine.submit(GenerationRequest(prompt=[5] * 50, max_new_tokens=30))
        assert err.value.field == "stopping.max_new_tokens" and f"context length is {limit}" in str(err.value)
        assert engine.queued == 0
        ids, _, finished = collect(neighbour)
        assert isinstance(first, TokenDelta) and len(first.token_ids) + len(ids) == 40
        assert finished.completion_tokens == 40
        ids, _, _ = collect(engine.submit(GenerationRequest(prompt=[5] * 50, max_new_tokens=14, ignore_eos=True)))
        assert len(ids) == 14  # exactly at the limit: runs
    finally:
        engine.close()


def test_max_model_len_never_raises_the_models_own(gpt2, tokenizer):
    with pytest.raises(ValueError, match="exceeds the model's context length 64"):
        engine_for(copy.deepcopy(gpt2), tokenizer, max_model_len=65)
    engine = engine_for(copy.deepcopy(gpt2), tokenizer, max_total_tokens=4096)
    try:
        assert engine.limits.max_total_tokens == 64  # max_total_tokens is at most the context length
    finally:
        engine.close()


def test_the_kv_probe_measures_keys_and_values_of_every_layer(gpt2, base_model):
    assert kv_bytes_per_token(gpt2) == 2 * 2 * 32 * 4  # 2 layers x (K, V) x hidden 32 x fp32
    heads, dim = base_model.config.num_key_value_heads, base_model.config.hidden_size // 4
    assert kv_bytes_per_token(base_model) == base_model.config.num_hidden_layers * 2 * heads * dim * 4


def test_kv_budget_cost_counts_padding_and_spare_room():
    budget = KvBudget(bytes_per_token=10, max_bytes=10 * 4 * buffer_columns(100))
    assert budget.cost([100, 20, 30, 40]) == 4 * buffer_columns(100) * 10  # every row as wide as the longest
    assert budget.fits([100, 1, 1, 1]) and not budget.fits([100, 1, 1, 1, 1])
    assert budget.fits([budget.longest_alone()]) and not budget.fits([budget.longest_alone() + 1])


def test_a_burst_of_long_requests_stays_within_the_kv_budget(base_model, tokenizer):
    """Budget for 3 rows of 200 tokens at most; 8 long requests at once: each step's cache stays within it, and
    every request completes with the output it has alone."""
    model = copy.deepcopy(base_model)
    per_token = kv_bytes_per_token(model)
    budget = 3 * buffer_columns(200) * per_token
    sizes: list[int] = []
    engine = engine_for(model, tokenizer, max_kv_bytes=budget, max_batch_rows=8, prefill_chunk_tokens=64)
    engine._on_step = lambda _: sizes.append(engine.load().kv_cache_bytes)
    prompts = [[(7 * i + j) % 300 + 5 for j in range(100 + 10 * i)] for i in range(8)]
    try:
        channels = [
            engine.submit(GenerationRequest(prompt=p, max_new_tokens=200 - len(p), ignore_eos=True)) for p in prompts
        ]
        results = [collect(c)[0] for c in channels]
        assert engine.load().kv_cache_max_bytes == budget
        solo = [
            collect(engine.submit(GenerationRequest(prompt=p, max_new_tokens=200 - len(p), ignore_eos=True)))[0]
            for p in prompts[:2]
        ]
    finally:
        engine.close()
    assert [len(r) for r in results] == [200 - len(p) for p in prompts]
    assert results[:2] == solo
    assert sizes and max(sizes) <= budget, (max(sizes), budget)
    assert max(sizes) > budget // 3  # it did run several rows at once


def test_a_request_that_could_never_fit_is_refused_at_once(base_model, tokenizer):
    model = copy.deepcopy(base_model)
    per_token = kv_bytes_per_token(model)
    engine = engine_for(model, tokenizer, max_kv_bytes=buffer_columns(100) * per_token)
    try:
        with pytest.raises(CapacityExceededError) as err:
            engine.submit(GenerationRequest(prompt=[5] * 50, max_new_tokens=60))
        assert err.value.field == "max_kv_memory" and "at most" in str(err.value)
        assert (
            len(collect(engine.submit(GenerationRequest(prompt=[5] * 50, max_new_tokens=50, ignore_eos=True)))[0]) == 50
        )
    finally:
        engine.close()


def test_an_oversize_text_is_refused_before_tokenizing(base_model, tokenizer, monkeypatch):
    engine = engine_for(copy.deepcopy(base_model), tokenizer, max_prompt_tokens=64)
    try:
        calls = []
        monkeypatch.setattr(tokenizer, "__call__", lambda *a, **k: calls.append(1))
        huge = "x" * (8 << 20)
        started = time.perf_counter()
        with pytest.raises(CapacityExceededError) as err:
            engine.submit(GenerationRequest(prompt=huge))
        assert time.perf_counter() - started < 0.05
        assert err.value.field == "input" and "not tokenized" in str(err.value) and not calls
        assert engine.limits.max_prompt_bytes < 1 << 20
    finally:
        engine.close()


def test_a_failed_forward_ends_every_row_and_the_next_request_succeeds(base_model, tokenizer):
    model = copy.deepcopy(base_model)
    engine = engine_for(model, tokenizer, max_batch_rows=4)
    head = model.lm_head  # called by every forward, and by the engine's own decode step (model.decode_step)
    forward, failing = head.forward, threading.Event()

    def flaky(hidden):
        if failing.is_set() and hidden.shape[1] == 1:  # a decode step: one token per row
            failing.clear()
            raise RuntimeError("injected: a decode step failed")
        return forward(hidden)

    head.forward = flaky
    try:
        channels = [
            engine.submit(GenerationRequest(prompt=[5, 6, i], max_new_tokens=50, ignore_eos=True)) for i in range(7, 10)
        ]
        streams = [iter(c) for c in channels]
        for stream in streams:
            assert isinstance(next(stream), TokenDelta)  # all three are decoding
        failing.set()
        for stream in streams:
            with pytest.raises(EngineFailure):
                list(stream)
        assert engine.running_rows == 0 and engine.cached_rows == 0
        assert len(collect(engine.submit(GenerationRequest(prompt=[5, 6], max_new_tokens=5, ignore_eos=True)))[0]) == 5
    finally:
        engine.close()


def test_a_bug_outside_the_forward_ends_the_batch_not_the_engine(base_model, tokenizer, monkeypatch):
    """A failure in the step's bookkeeping (here: reordering the batch after a row leaves) used to end the
    engine thread, leaving every stream waiting for ever; now those rows fail and the engine serves on."""
    import concurrent.futures

    import loramux.core.engine.engine as engine_module

    engine = engine_for(copy.deepcopy(base_model), tokenizer, max_batch_rows=4)
    real, failing = engine_module.swap_remove, threading.Event()

    def flaky(n, removed):
        if failing.is_set():
            failing.clear()
            raise RuntimeError("injected: a bookkeeping bug")
        return real(n, removed)

    monkeypatch.setattr(engine_module, "swap_remove", flaky)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    try:
        long = [engine.submit(GenerationRequest(prompt=[5, 6, i], max_new_tokens=50, ignore_eos=True)) for i in (7, 8)]
        streams = [iter(c) for c in long]
        for stream in streams:
            assert isinstance(next(stream), TokenDelta)  # both are decoding
        failing.set()
        short = engine.submit(GenerationRequest(prompt=[5, 6, 9], max_new_tokens=1, ignore_eos=True))
        # its Finished is delivered, then reordering the batch after it hits the bug: the others end in error
        assert len(pool.submit(collect, short).result(timeout=60)[0]) == 1
        for stream in streams:
            with pytest.raises(EngineFailure):
                pool.submit(list, stream).result(timeout=60)
        assert not failing.is_set() and engine.running_rows == 0
        after = pool.submit(collect, engine.submit(GenerationRequest(prompt=[5, 6], max_new_tokens=5, ignore_eos=True)))
        assert len(after.result(timeout=60)[0]) == 5
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        engine.close()
