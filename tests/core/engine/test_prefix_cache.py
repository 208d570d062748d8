"""The prefix cache: a hit gives what a full prefill gives, never across adapters, loads or versions, within its
memory budget, and a running row's blocks outlive eviction pressure.

Engine tests compare an engine with the cache against one without it (``prefix_cache_bytes=0``) on the same
model and adapters: greedy tokens equal, and every token's log-probability (the logits) within fp32 tolerance.
Blocks are 4 tokens here so that the tiny prompts span several.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from loramux.core import AdapterManager, AdapterSelection, Engine, EngineConfig, GenerationRequest, SamplingParams
from loramux.core.engine.prefix_cache import PrefixCache, chain_digests
from loramux.core.engine.requests import Finished
from loramux.core.errors import RequestCancelledError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
BLOCK = 4
WARM = list(range(10, 31))  # 21 tokens: 5 full blocks


@pytest.fixture
def make_engine(base_model, tokenizer, adapter_dirs):
    engines: list[Engine] = []

    def make(**config) -> Engine:
        model = copy.deepcopy(base_model)
        manager = AdapterManager(model)
        for name, path in adapter_dirs.items():
            manager.load_adapter(str(path), name)
        config = {"max_batch_rows": 8, "prefix_block_tokens": BLOCK, **config}
        engines.append(Engine(model, tokenizer, manager, EngineConfig(**config)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def run(engine: Engine, prompt: list[int], *, adapter=AdapterSelection.BASE, n: int = 6, **kwargs):
    request = GenerationRequest(
        prompt=prompt, adapter=adapter, max_new_tokens=n, ignore_eos=True, logprobs=True, top_logprobs=3, **kwargs
    )
    events = list(engine.submit(request))
    ids = [t for e in events[:-1] for t in e.token_ids]
    logprobs = [lp.logprob for e in events[:-1] for lp in e.logprobs]
    return ids, logprobs


def assert_same(got, want) -> None:
    (ids, logprobs), (want_ids, want_logprobs) = got, want
    assert ids == want_ids
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("prompt", "reused"),
    [
        ([*list(range(10, 13)), 99, 98, 97, 96, 95], 0),  # shares 3 tokens: less than a block
        ([*list(range(10, 20)), 99, 98, 97], 8),  # shares 10 tokens: two whole blocks of them
        (WARM[:17], 16),  # the whole prompt but its last token (17 = 4 blocks + 1)
        (WARM[:16], 12),  # a prompt of whole blocks: its last token is prefilled, so its last block is not reused
        (WARM, 20),
    ],
    ids=["none", "partial-block", "all-but-one", "whole-blocks", "same-prompt"],
)
@pytest.mark.parametrize("adapter", ["math", AdapterSelection.BASE], ids=["adapter", "base"])
def test_a_hit_of_any_length_gives_the_full_prefills_output(make_engine, prompt, reused, adapter):
    cached, plain = make_engine(), make_engine(prefix_cache_bytes=0)
    run(cached, WARM, adapter=adapter)
    before = cached.prefix_stats()
    assert_same(run(cached, prompt, adapter=adapter), run(plain, prompt, adapter=adapter))
    after = cached.prefix_stats()
    assert after.lookups == before.lookups + 1
    assert after.hit_tokens - before.hit_tokens == reused
    assert after.hits - before.hits == (reused > 0)
    assert plain.prefix_stats().lookups == 0 and plain.prefix_stats().bytes == 0


def test_finished_reports_the_cached_prompt_tokens(make_engine):
    engine = make_engine()

    def finished(prompt, adapter="math"):
        return list(engine.submit(GenerationRequest(prompt=prompt, adapter=adapter, max_new_tokens=2)))[-1]

    assert finished(WARM).cached_prompt_tokens == 0
    assert finished(WARM).cached_prompt_tokens == 20
    assert finished([*WARM[:10], 3]).cached_prompt_tokens == 8
    assert finished(WARM, adapter="poet").cached_prompt_tokens == 0


def test_a_batch_of_hits_and_misses_of_different_lengths(make_engine):
    cached, plain = make_engine(), make_engine(prefix_cache_bytes=0)
    run(cached, WARM, adapter="math")
    run(cached, [*WARM[:9], 70, 71], adapter="poet")
    prompts = [[*WARM, 40, 41, 42], [*WARM[:9], 70, 71, 72, 73, 74, 75], [50, 51], WARM[:13], [60] * 30]
    adapters = ["math", "poet", "math", AdapterSelection.BASE, "poet"]
    channels = [
        cached.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=5, ignore_eos=True, logprobs=True))
        for p, a in zip(prompts, adapters, strict=True)
    ]
    for channel, prompt, adapter in zip(channels, prompts, adapters, strict=True):
        events = list(channel)
        got = ([t for e in events[:-1] for t in e.token_ids], [lp.logprob for e in events[:-1] for lp in e.logprobs])
        assert_same(got, run(plain, prompt, adapter=adapter, n=5))
    assert cached.prefix_stats().hits >= 2


def test_never_across_adapters(make_engine):
    cached, plain = make_engine(), make_engine(prefix_cache_bytes=0)
    run(cached, WARM, adapter="math")
    before = cached.prefix_stats()
    assert_same(run(cached, WARM, adapter="poet"), run(plain, WARM, adapter="poet"))
    assert_same(run(cached, WARM, adapter=AdapterSelection.BASE), run(plain, WARM, adapter=AdapterSelection.BASE))
    after = cached.prefix_stats()
    assert (after.lookups, after.hits, after.hit_tokens) == (before.lookups + 2, before.hits, before.hit_tokens)


def test_replacing_an_adapter_invalidates_its_blocks(make_engine, adapter_dirs):
    cached, plain = make_engine(), make_engine(prefix_cache_bytes=0)
    run(cached, WARM, adapter="math")
    assert run(cached, WARM, adapter="math") and cached.prefix_stats().hits == 1
    for engine in (cached, plain):  # "math" now has poet's weights: version 2
        engine.manager.load_adapter(str(adapter_dirs["poet"]), "math", replace=True)
    before = cached.prefix_stats()
    assert_same(run(cached, WARM, adapter="math"), run(plain, WARM, adapter="poet"))
    assert cached.prefix_stats().hits == before.hits  # a miss: version 1's blocks are never used


def test_an_evicted_and_reloaded_adapter_is_a_new_owner(make_engine):
    engine = make_engine()
    run(engine, WARM, adapter="math")
    first = engine.manager.get_adapter("math")
    engine.manager.unload_adapter("math")
    engine.manager.load_adapter(first.source, "math")
    before = engine.prefix_stats()
    run(engine, WARM, adapter="math")
    assert engine.prefix_stats().hits == before.hits


def test_a_mix_is_not_cached(make_engine):
    engine = make_engine()
    mix = (("math", 0.5), ("poet", 0.5))
    for _ in range(2):
        events = list(engine.submit(GenerationRequest(prompt=WARM, adapter_mix=mix, max_new_tokens=3)))
        assert events[-1].adapter_mix
    stats = engine.prefix_stats()
    assert (stats.lookups, stats.blocks) == (0, 0)


def test_a_conversations_next_turn_reuses_the_last_answer(make_engine):
    cached, plain = make_engine(), make_engine(prefix_cache_bytes=0)
    turn1 = WARM[:10]
    answer, _ = run(cached, turn1, adapter="math", n=12)
    turn2 = turn1 + answer + [90, 91, 92]  # 25 tokens: the first 21 (prompt + answer but its last) have KV
    before = cached.prefix_stats()
    assert_same(run(cached, turn2, adapter="math"), run(plain, turn2, adapter="math"))
    assert cached.prefix_stats().hit_tokens - before.hit_tokens == 20  # 5 blocks, into the answer


def test_a_seeded_sample_is_the_same_with_a_hit(make_engine):
    cached, plain = make_engine(), make_engine(prefix_cache_bytes=0)
    sampling = SamplingParams(temperature=0.9, top_k=20, seed=1234)
    run(cached, WARM, adapter="poet")
    got = run(cached, [*WARM, 5], adapter="poet", n=10, sampling=sampling)
    assert cached.prefix_stats().hit_tokens >= 20
    assert_same(got, run(plain, [*WARM, 5], adapter="poet", n=10, sampling=sampling))


def test_a_long_suffix_still_chunks_after_a_hit(make_engine):
    cached, plain = make_engine(prefill_chunk_tokens=8), make_engine(prefix_cache_bytes=0, prefill_chunk_tokens=8)
    long = WARM + list(range(40, 70))  # 51 tokens: 20 reused, 31 prefilled in chunks of 8
    run(cached, WARM, adapter="math")
    assert_same(run(cached, long, adapter="math"), run(plain, long, adapter="math"))
    assert cached.prefix_stats().hit_tokens == 20
    # the long prompt was cached by its chunked prefill too
    assert_same(run(cached, [*long, 1], adapter="math"), run(plain, [*long, 1], adapter="math"))
    assert cached.prefix_stats().hit_tokens == 20 + 48


def test_prompt_logprobs_are_computed_whole(make_engine):
    cached, plain = make_engine(), make_engine(prefix_cache_bytes=0)
    run(cached, WARM, adapter="math")

    def prompt_logprobs(engine):
        request = GenerationRequest(prompt=WARM, adapter="math", max_new_tokens=1, prompt_logprobs=True)
        return [lp.logprob for lp in list(engine.submit(request))[-1].prompt_logprobs]

    got, want = prompt_logprobs(cached), prompt_logprobs(plain)
    assert len(got) == len(WARM) - 1
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def test_memory_stays_within_the_budget_under_churn(make_engine):
    engine = make_engine(prefix_cache_bytes=6_000)
    rng = random.Random(3)
    stats = engine.prefix_stats()
    for i in range(40):
        prompt = [rng.randrange(1, 128) for _ in range(rng.randrange(5, 30))]
        run(engine, prompt, adapter=["math", "poet", AdapterSelection.BASE][i % 3], n=2)
        stats = engine.prefix_stats()
        assert 0 < stats.bytes <= stats.max_bytes == 6_000
    assert stats.evictions > 0


def test_a_running_rows_blocks_survive_eviction_pressure(make_engine):
    engine = make_engine(prefix_cache_bytes=6_000)  # room for about 5 blocks of this model
    long = GenerationRequest(prompt=WARM[:9], adapter="math", max_new_tokens=1800, ignore_eos=True)
    running = engine.submit(long)
    first = next(iter(running))  # it is in the batch, holding its prompt's 2 blocks
    assert first.token_ids
    rng = random.Random(4)
    for _ in range(12):  # other prompts fill the cache over and over
        run(engine, [rng.randrange(1, 128) for _ in range(17)], adapter="poet", n=2)
    before = engine.prefix_stats()
    assert before.evictions > 0 and before.skipped > 0  # it was full: blocks were evicted, some not added
    run(engine, WARM[:9], adapter="math", n=2)
    assert engine.prefix_stats().hit_tokens - before.hit_tokens == 8
    running.cancel()
    with pytest.raises(RequestCancelledError):  # it was still running: the test meant something
        for event in running:
            assert not isinstance(event, Finished), "the long request finished too early for this test"


# -- the block store alone -----------------------------------------------------------------------------


def _kv():
    def kv(start: int, end: int):
        return [torch.full((2, end - start, 4), float(start))], [torch.full((2, end - start, 4), float(-start))]

    return kv


def test_digests_depend_on_owner_and_every_token_before():
    a = chain_digests(1, list(range(12)), block_tokens=4)
    assert len(a) == 3 and len(set(a)) == 3
    assert chain_digests(2, list(range(12)), block_tokens=4) != a
    changed = chain_digests(1, [99, *range(1, 12)], block_tokens=4)
    assert all(x != y for x, y in zip(changed, a, strict=True))  # a change in block 0 changes every later digest
    assert chain_digests(1, list(range(12)), block_tokens=4) == a


def test_store_evicts_unheld_chains_tails_first_and_never_held_blocks():
    store = PrefixCache(max_bytes=3 * 256, block_tokens=4)  # 3 blocks of 1 layer x (2, 4, 4) floats x (K, V)
    tokens = list(range(12))
    digests = chain_digests(1, tokens, block_tokens=4)
    held = store.extend([], digests, tokens, _kv())
    assert len(held) == 3 and store.stats().bytes == 768
    other = list(range(50, 58))
    other_digests = chain_digests(1, other, block_tokens=4)
    assert store.extend([], other_digests, other, _kv()) == []  # all held: nothing evicted, nothing added
    assert store.stats().skipped == 1
    store.release(held)
    added = store.extend([], other_digests, other, _kv())
    assert len(added) == 2 and store.stats().bytes <= 768
    assert len(store.match(digests, tokens, limit=12)) == 1  # the chain's tail went first, its start stayed
    assert torch.equal(store.match(digests, tokens, limit=12)[0].keys[0], torch.zeros(2, 4, 4))


def test_evicting_a_block_evicts_the_blocks_after_it():
    store = PrefixCache(max_bytes=4 * 256, block_tokens=4)
    tokens = list(range(16))
    digests = chain_digests(1, tokens, block_tokens=4)
    store.release(store.extend([], digests, tokens, _kv()))
    first = store.match(digests, tokens, limit=16)[0]
    store._evict(first)
    assert store.stats().blocks == 0 and store.stats().bytes == 0


def test_config_checks_the_prefix_cache_settings():
    assert EngineConfig(prefix_cache_bytes=0).prefix_cache_bytes == 0
    for bad in ({"prefix_cache_bytes": -1}, {"prefix_cache_bytes": 1.5}, {"prefix_block_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)


def test_a_failure_to_add_blocks_never_fails_a_request(make_engine, monkeypatch, caplog):
    engine, plain = make_engine(), make_engine(prefix_cache_bytes=0)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(PrefixCache, "extend", broken)
    assert_same(run(engine, WARM, adapter="math"), run(plain, WARM, adapter="math"))
    assert_same(run(engine, WARM, adapter="math"), run(plain, WARM, adapter="math"))
    assert engine.prefix_stats().blocks == 0 and "could not add blocks" in caplog.text
