"""Engine behaviour: mixed-adapter continuous batching equals PEFT greedy, sampling, streaming, limits.

The tiny model, tokenizer and the "math"/"poet" adapters are tests/generation_fixtures.py's."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import shutil
import threading

import pytest
import torch

from loramux.core import (
    AdapterManager,
    AdapterSelection,
    Engine,
    EngineConfig,
    FinishReason,
    GenerationRequest,
    LinearKernel,
    SamplingParams,
    TokenDelta,
    memory,
)
from loramux.core.engine.config import LIMITS
from loramux.core.errors import (
    AdapterNotFoundError,
    CapacityExceededError,
    InvalidArgumentError,
    RequestCancelledError,
    ShuttingDownError,
)
from loramux.core.lora.kernel_choice import LoraKernel
from loramux.core.model.native_linear import native_linear
from tests.core.lora.test_native_kernel import count_kernel_calls
from tests.generation_fixtures import VOCAB, collect
from tests.service.harness import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def make_engine(base_model, tokenizer, adapter_dirs, **config) -> Engine:
    model = copy.deepcopy(base_model)
    manager = AdapterManager(model)
    for name, path in adapter_dirs.items():
        manager.load_adapter(str(path), name)
    return Engine(model, tokenizer, manager, EngineConfig(**config))


@pytest.fixture
def engine(base_model, tokenizer, adapter_dirs):
    eng = make_engine(base_model, tokenizer, adapter_dirs)
    yield eng
    eng.close()


KERNELS = [(k, LoraKernel.AUTO) for k in LinearKernel] + [(LinearKernel.AUTO, k) for k in LoraKernel][1:]


@pytest.fixture(params=KERNELS, ids=lambda p: f"{p[0].value}-lora_{p[1].value}")
def engine_each_kernel(request, base_model, tokenizer, adapter_dirs, monkeypatch):
    linear, lora = request.param
    calls = count_kernel_calls(monkeypatch)
    if lora is LoraKernel.NATIVE and shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the native LoRA kernel")
    if linear is LinearKernel.NATIVE and isinstance(why := native_linear(), str):
        pytest.skip(f"the native linear kernel cannot run here: {why}")
    eng = make_engine(base_model, tokenizer, adapter_dirs, linear_kernel=linear, lora_kernel=lora)
    assert (eng.lora_kernel.kernel is not None) == (lora is LoraKernel.NATIVE) or lora is LoraKernel.AUTO
    yield eng
    eng.close()
    assert bool(calls) == (eng.lora_kernel.kernel is not None), "decode steps of rows sharing adapters ran it"


def peft_greedy(peft_model, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = dict(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(**kwargs)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(**kwargs)
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21], [30, 31, 32, 33]]
CHOICES: list[str | AdapterSelection] = ["math", "poet", AdapterSelection.BASE, "math", "poet"]


def test_mixed_adapters_equal_peft_greedy(engine_each_kernel, peft_model):
    engine = engine_each_kernel
    channels = [
        engine.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=10, ignore_eos=True))
        for p, a in zip(PROMPTS, CHOICES, strict=True)
    ]
    for prompt, choice, channel in zip(PROMPTS, CHOICES, channels, strict=True):
        ids, _, finished = collect(channel)
        name = None if choice is AdapterSelection.BASE else choice
        assert ids == peft_greedy(peft_model, prompt, name, 10)
        assert finished.reason is FinishReason.LENGTH
        assert (finished.prompt_tokens, finished.completion_tokens, finished.adapter) == (len(prompt), 10, name)


def test_rows_joining_mid_flight_equal_peft_greedy(engine, peft_model):
    first = engine.submit(GenerationRequest(prompt=PROMPTS[0], adapter="math", max_new_tokens=12, ignore_eos=True))
    stream = iter(first)
    head = [next(stream) for _ in range(3)]  # the first request is decoding when the others arrive
    later = [
        engine.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=6, ignore_eos=True))
        for p, a in zip(PROMPTS[1:], CHOICES[1:], strict=True)
    ]
    ids = [t for e in head for t in e.token_ids] + [t for e in stream if isinstance(e, TokenDelta) for t in e.token_ids]
    assert ids == peft_greedy(peft_model, PROMPTS[0], "math", 12)
    for prompt, choice, channel in zip(PROMPTS[1:], CHOICES[1:], later, strict=True):
        name = None if choice is AdapterSelection.BASE else choice
        assert collect(channel)[0] == peft_greedy(peft_model, prompt, name, 6)


def test_default_adapter_is_resolved_at_submit(engine, peft_model):
    engine.manager.set_adapter("poet")
    ids, _, finished = collect(engine.submit(GenerationRequest(prompt=PROMPTS[0], max_new_tokens=5, ignore_eos=True)))
    assert finished.adapter == "poet"
    assert ids == peft_greedy(peft_model, PROMPTS[0], "poet", 5)


def test_seeded_sampling_is_independent_of_batch_composition(base_model, tokenizer, adapter_dirs):
    sampling = SamplingParams(temperature=1.3, top_k=50, top_p=0.95, seed=1234)
    request = GenerationRequest(
        prompt=PROMPTS[2], adapter="math", sampling=sampling, max_new_tokens=16, ignore_eos=True
    )
    eng = make_engine(base_model, tokenizer, adapter_dirs)
    try:
        alone = collect(eng.submit(request))[0]
        others = [
            eng.submit(
                GenerationRequest(
                    prompt=p, adapter=a, sampling=SamplingParams(temperature=0.9, seed=i), max_new_tokens=20
                )
            )
            for i, (p, a) in enumerate(zip(PROMPTS, CHOICES, strict=True))
        ]
        crowded = collect(eng.submit(request))[0]
        for channel in others:
            collect(channel)
    finally:
        eng.close()
    assert alone == crowded
    assert len(alone) == 16


def test_streamed_text_is_valid_utf8_and_concatenates_to_the_decode(engine, tokenizer):
    prompt = "Café, naïve façade, Straße — 中文字符 and emoji 🙂"
    request = GenerationRequest(
        prompt=prompt,
        adapter="math",
        sampling=SamplingParams(temperature=1.0, seed=7),
        max_new_tokens=40,
        ignore_eos=True,
    )
    deltas, ids = [], []
    for event in engine.submit(request):
        if isinstance(event, TokenDelta):
            deltas.append(event.text)
            ids += event.token_ids
    final = tokenizer.decode(ids, skip_special_tokens=True)
    # Nothing is ever taken back: every streamed prefix is a prefix of the final text (a character cut
    # between tokens is held back, not sent as U+FFFD and then "corrected").
    for k in range(len(deltas)):
        assert final.startswith("".join(deltas[:k]))
    assert "".join(deltas) == final
    assert any(ord(c) > 127 for c in final), "the sample should exercise multi-byte characters"


def test_stop_string_ends_the_stream_before_the_stop(engine):
    base_request = GenerationRequest(prompt=PROMPTS[1], adapter="poet", max_new_tokens=24, ignore_eos=True)
    _, full_text, _ = collect(engine.submit(base_request))
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    assert stop, "the greedy output is empty"
    request = GenerationRequest(prompt=PROMPTS[1], adapter="poet", max_new_tokens=24, ignore_eos=True, stop=(stop,))
    _, text, finished = collect(engine.submit(request))
    assert finished.reason is FinishReason.STOP_SEQUENCE
    assert text == full_text[: full_text.index(stop)]


def test_cancel_frees_the_row_within_one_step(base_model, tokenizer, adapter_dirs):
    sizes: list[int] = []
    eng = make_engine(base_model, tokenizer, adapter_dirs)
    eng._on_step = sizes.append  # observe each decode step's batch size
    try:
        channels = [
            eng.submit(GenerationRequest(prompt=p, adapter="math", max_new_tokens=200, ignore_eos=True))
            for p in PROMPTS[:3]
        ]
        streams = [iter(c) for c in channels]
        for s in streams:
            next(s)
            next(s)  # the second token comes from a decode step: all three are running together by now
        channels[1].cancel()
        with pytest.raises(RequestCancelledError):
            for _ in streams[1]:
                pass
        # The error is sent while the row is being dropped; the next decode step comes after the drop.
        stepped = threading.Event()
        eng._on_step = lambda n: (sizes.append(n), stepped.set())
        assert stepped.wait(timeout=60)
        assert eng.running_rows == 2
        assert eng.cached_rows == 2
        assert sizes[-1] == 2 and 3 in sizes
        channels[0].cancel()
        channels[2].cancel()
    finally:
        eng.close()


def test_max_batch_rows_queues_the_rest(base_model, tokenizer, adapter_dirs):
    sizes: list[int] = []
    eng = make_engine(base_model, tokenizer, adapter_dirs, max_batch_rows=2)
    eng._on_step = sizes.append
    try:
        channels = [
            eng.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=4, ignore_eos=True))
            for p, a in zip(PROMPTS, CHOICES, strict=True)
        ]
        results = [collect(c) for c in channels]
    finally:
        eng.close()
    assert max(sizes) == 2
    assert all(len(ids) == 4 for ids, _, _ in results)


@pytest.mark.parametrize(
    ("config", "request_kwargs", "error", "field"),
    [
        ({"max_prompt_tokens": 4}, {"prompt": [1, 2, 3, 4, 5]}, CapacityExceededError, "input"),
        (
            {"max_new_tokens_ceiling": 8},
            {"prompt": [1, 2], "max_new_tokens": 9},
            InvalidArgumentError,
            "stopping.max_new_tokens",
        ),
        ({}, {"prompt": [1, 2], "max_new_tokens": 0}, InvalidArgumentError, "stopping.max_new_tokens"),
        (
            {"max_total_tokens": 10},
            {"prompt": [1] * 6, "max_new_tokens": 5},
            CapacityExceededError,
            "stopping.max_new_tokens",
        ),
        ({}, {"prompt": []}, InvalidArgumentError, "input"),
        ({}, {"prompt": [1, VOCAB + 5]}, InvalidArgumentError, "token_ids"),
        ({}, {"prompt": [1, 2], "adapter": "missing"}, AdapterNotFoundError, "adapter"),
    ],
)
def test_limits_and_bad_input_are_refused(base_model, tokenizer, adapter_dirs, config, request_kwargs, error, field):
    eng = make_engine(base_model, tokenizer, adapter_dirs, **config)
    try:
        with pytest.raises(error) as info:
            eng.submit(GenerationRequest(**request_kwargs))
        assert info.value.field == field
        assert eng.queued == 0 and eng.running_rows == 0
    finally:
        eng.close()


def test_queue_limit_refuses_with_resource_exhausted(base_model, tokenizer, adapter_dirs):
    eng = make_engine(base_model, tokenizer, adapter_dirs, max_queued=1, max_batch_rows=1)
    gate = threading.Event()
    eng._on_step = lambda _: gate.wait()  # hold the engine inside its first decode step
    try:
        running = eng.submit(GenerationRequest(prompt=[1, 2], max_new_tokens=3, ignore_eos=True))
        stream = iter(running)
        next(stream)  # the first request is admitted; the engine now blocks in its decode step
        eng.submit(GenerationRequest(prompt=[3, 4], max_new_tokens=3, ignore_eos=True))  # fills the queue
        with pytest.raises(CapacityExceededError):
            eng.submit(GenerationRequest(prompt=[5, 6], max_new_tokens=3, ignore_eos=True))
    finally:
        gate.set()
        eng.close()


def test_unload_while_in_flight_keeps_the_weights(engine, peft_model):
    channel = engine.submit(GenerationRequest(prompt=PROMPTS[0], adapter="math", max_new_tokens=10, ignore_eos=True))
    stream = iter(channel)
    first = next(stream)
    engine.manager.unload_adapter("math")
    rest = [t for e in stream if isinstance(e, TokenDelta) for t in e.token_ids]
    assert list(first.token_ids) + rest == peft_greedy(peft_model, PROMPTS[0], "math", 10)
    with pytest.raises(AdapterNotFoundError):
        engine.submit(GenerationRequest(prompt=PROMPTS[0], adapter="math"))


def test_async_iteration(engine, peft_model):
    async def run() -> list[int]:
        channel = engine.submit(GenerationRequest(prompt=PROMPTS[3], adapter="poet", max_new_tokens=6, ignore_eos=True))
        return [t async for e in channel if isinstance(e, TokenDelta) for t in e.token_ids]

    assert asyncio.run(run()) == peft_greedy(peft_model, PROMPTS[3], "poet", 6)


def test_eos_finishes_unless_ignored(engine):
    # Find the greedy continuation, then declare its third token the EOS.
    ids, _, _ = collect(
        engine.submit(GenerationRequest(prompt=PROMPTS[4], adapter="math", max_new_tokens=6, ignore_eos=True))
    )
    engine._eos = {ids[2]}
    stopped_ids, _, finished = collect(
        engine.submit(GenerationRequest(prompt=PROMPTS[4], adapter="math", max_new_tokens=6))
    )
    assert finished.reason is FinishReason.EOS
    assert stopped_ids == ids[: ids.index(ids[2])]
    assert finished.completion_tokens == ids.index(ids[2]) + 1


def test_close_ends_queued_and_running_requests(base_model, tokenizer, adapter_dirs):
    eng = make_engine(base_model, tokenizer, adapter_dirs)
    channel = eng.submit(GenerationRequest(prompt=[1, 2, 3], max_new_tokens=1000, ignore_eos=True))
    stream = iter(channel)
    next(stream)
    eng.close()
    with pytest.raises(ShuttingDownError):
        for _ in stream:
            pass
    with pytest.raises(ShuttingDownError):
        eng.submit(GenerationRequest(prompt=[1, 2]))


def test_rows_leaving_at_different_steps_keep_their_outputs(engine, peft_model):
    """Rows finish one after another (swap_remove moves tail rows into their places): every row still
    decodes exactly its own greedy continuation."""
    lengths = [3, 9, 5, 12, 7]
    channels = [
        engine.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=n, ignore_eos=True))
        for p, a, n in zip(PROMPTS, CHOICES, lengths, strict=True)
    ]
    for prompt, choice, n, channel in zip(PROMPTS, CHOICES, lengths, channels, strict=True):
        name = None if choice is AdapterSelection.BASE else choice
        assert collect(channel)[0] == peft_greedy(peft_model, prompt, name, n)


def test_prefill_budget_spreads_a_burst_over_steps(base_model, tokenizer, adapter_dirs, peft_model):
    """With room for two 4-token prompts per step, a burst of five joins two, two, then one at a time,
    while the rows already admitted keep decoding; every output is still its own greedy continuation."""
    sizes: list[int] = []
    eng = make_engine(base_model, tokenizer, adapter_dirs, max_prefill_tokens=8)
    eng._on_step = sizes.append
    prompts = [[5 + i, 6 + i, 7 + i, 8 + i] for i in range(5)]
    try:
        channels = [
            eng.submit(GenerationRequest(prompt=p, adapter="math", max_new_tokens=12, ignore_eos=True)) for p in prompts
        ]
        outputs = [collect(c)[0] for c in channels]
    finally:
        eng.close()
    assert outputs == [peft_greedy(peft_model, p, "math", 12) for p in prompts]
    assert sizes[0] <= 2  # at most two prompts fit the budget of a step
    assert max(sizes) == 5  # the rest joined at the next steps, beside the rows already decoding


def test_linear_kernel_is_chosen_by_config(base_model, tokenizer, adapter_dirs):
    from torch import nn

    from loramux.core.model.linear_kernels import LinearKernel, OneDnnLinear, onednn_works

    engine = make_engine(base_model, tokenizer, adapter_dirs, linear_kernel=LinearKernel.TORCH)
    try:
        assert engine.linear_kernel == LinearKernel.TORCH
        assert not any(isinstance(m, OneDnnLinear) for m in engine.model.modules())
    finally:
        engine.close()
    engine = make_engine(base_model, tokenizer, adapter_dirs, linear_kernel=LinearKernel.ONEDNN)
    try:
        assert engine.linear_kernel == (LinearKernel.ONEDNN if onednn_works() else LinearKernel.TORCH)
        kinds = {type(m) for m in engine.model.modules() if isinstance(m, nn.Linear)}
        assert kinds == ({OneDnnLinear} if onednn_works() else {nn.Linear})
    finally:
        engine.close()
    with pytest.raises(ValueError, match="linear_kernel must be a LinearKernel"):
        make_engine(base_model, tokenizer, {}, linear_kernel="mkl")
    with pytest.raises(ValueError, match="engine limits must be integers >= 1: max_queued=0, prefill_chunk_tokens=-1"):
        EngineConfig(max_queued=0, prefill_chunk_tokens=-1)
    with pytest.raises(ValueError, match="max_batch_rows=True"):
        EngineConfig(max_batch_rows=True)


def test_every_int_field_of_the_engine_config_is_a_checked_limit():
    ints = [f.name for f in dataclasses.fields(EngineConfig) if isinstance(f.default, int) and f.default is not True]
    assert set(ints) - {"ragged_attention", "join_wait_steps"} == set(LIMITS)  # join_wait_steps may be 0


@pytest.mark.parametrize("field, value", [("join_wait_steps", -1), ("join_wait_steps", 1.5), ("join_fraction", 1.5)])
def test_join_settings_out_of_range_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


LONG_PROMPT = [(7 * i + 3) % (VOCAB - 10) + 5 for i in range(21)]  # 6 chunks of 4 (the last has 1 token)


def test_a_long_prompt_prefills_in_chunks_while_the_batch_decodes(base_model, tokenizer, adapter_dirs, peft_model):
    sizes: list[int] = []
    eng = make_engine(base_model, tokenizer, adapter_dirs, prefill_chunk_tokens=4)
    eng._on_step = sizes.append
    try:
        short = eng.submit(GenerationRequest(prompt=PROMPTS[0], adapter="poet", max_new_tokens=20, ignore_eos=True))
        long = eng.submit(GenerationRequest(prompt=LONG_PROMPT, adapter="math", max_new_tokens=8, ignore_eos=True))
        short_ids, long_ids = collect(short)[0], collect(long)[0]
    finally:
        eng.close()
    assert long_ids == peft_greedy(peft_model, LONG_PROMPT, "math", 8)
    assert short_ids == peft_greedy(peft_model, PROMPTS[0], "poet", 20)
    first_pair = sizes.index(2)
    assert first_pair >= 5 and set(sizes[:first_pair]) == {1}  # the short row decoded through 5+ chunks alone


def test_a_long_prompt_cancelled_mid_prefill_never_joins(base_model, tokenizer, adapter_dirs):
    eng = make_engine(base_model, tokenizer, adapter_dirs, prefill_chunk_tokens=4)
    sizes: list[int] = []
    pending: list = []

    def cancel_mid_prefill(rows: int) -> None:  # on the engine thread, after a decode step
        sizes.append(rows)
        job = eng._chunking
        if pending and job is not None and 0 < job.done < len(LONG_PROMPT):
            pending[0].cancel()

    eng._on_step = cancel_mid_prefill
    try:
        short = eng.submit(GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, ignore_eos=True))
        pending.append(eng.submit(GenerationRequest(prompt=LONG_PROMPT, max_new_tokens=4, ignore_eos=True)))
        with pytest.raises(RequestCancelledError):
            collect(pending[0])
        assert len(collect(short)[0]) == 12
    finally:
        eng.close()
    assert set(sizes) == {1} and eng.queued == 0 and eng.running_rows == 0


def test_long_prompts_take_turns_and_shutdown_ends_a_pending_one(base_model, tokenizer, adapter_dirs, peft_model):
    eng = make_engine(base_model, tokenizer, adapter_dirs, prefill_chunk_tokens=4)
    try:
        first = eng.submit(GenerationRequest(prompt=LONG_PROMPT, adapter="poet", max_new_tokens=3, ignore_eos=True))
        second = eng.submit(GenerationRequest(prompt=LONG_PROMPT[::-1], max_new_tokens=3, ignore_eos=True))
        assert collect(first)[0] == peft_greedy(peft_model, LONG_PROMPT, "poet", 3)
        assert collect(second)[0] == peft_greedy(peft_model, LONG_PROMPT[::-1], None, 3)
        third = eng.submit(GenerationRequest(prompt=LONG_PROMPT, max_new_tokens=3, ignore_eos=True))
    finally:
        eng.close()
    with pytest.raises(ShuttingDownError):
        collect(third)


def test_the_next_batch_routes_on_the_buffers_the_last_one_gave_back(base_model, tokenizer, adapter_dirs, peft_model):
    """Mixed adapters decode on gathered stacks leased from the engine's workspace; when the batch empties
    they go back, and the next batch (other rows, other order) leases the same memory and still equals PEFT.
    (torch's routes: the native kernel reads the adapters in place and leases nothing.)"""
    engine = make_engine(base_model, tokenizer, adapter_dirs, lora_kernel=LoraKernel.TORCH)
    try:
        _two_batches_on_kept_buffers(engine, peft_model)
    finally:
        engine.close()


def _two_batches_on_kept_buffers(engine: Engine, peft_model) -> None:
    first_kept: dict[str, int] = {}
    for picked in ([0, 1, 2], [2, 1, 0, 1]):  # more distinct adapters than half the rows: the gathered route
        channels = [
            engine.submit(GenerationRequest(prompt=PROMPTS[i], adapter=CHOICES[i], max_new_tokens=6, ignore_eos=True))
            for i in picked
        ]
        for i, channel in zip(picked, channels, strict=True):
            name = None if CHOICES[i] is AdapterSelection.BASE else CHOICES[i]
            assert collect(channel)[0] == peft_greedy(peft_model, PROMPTS[i], name, 6)
        assert engine.running_rows == 0
        kept = {name: bufs[0].data_ptr() for name, bufs in engine._workspace._spare.items()}
        assert kept and engine._workspace.nbytes > 0
        if first_kept:  # the second batch: every module's stacks are the memory the first one gave back
            assert kept == first_kept
        first_kept = kept


def test_the_next_batch_keeps_its_kv_on_the_pages_the_last_one_used(
    monkeypatch, base_model, tokenizer, adapter_dirs, peft_model
):
    """Every KV buffer comes from the engine's arena and goes back when the batch empties: a second batch of
    the same requests lands on the same pages (the arena's high-water mark stays) and still equals PEFT."""
    monkeypatch.setattr(memory, "MIN_MAPPED_BYTES", 1)  # the tiny model's KV buffers are a few KiB each
    engine = make_engine(base_model, tokenizer, adapter_dirs)
    try:
        touched = []
        for _ in range(2):
            # both batches shaped alike: one prefill of every request (the engine waits for its lock, an RLock,
            # to see its queue), not groups split by when the engine thread happened to look
            with engine._wakeup:
                channels = [
                    engine.submit(GenerationRequest(prompt=p, adapter=c, max_new_tokens=6, ignore_eos=True))
                    for p, c in zip(PROMPTS, CHOICES, strict=True)
                ]
            for prompt, choice, channel in zip(PROMPTS, CHOICES, channels, strict=True):
                name = None if choice is AdapterSelection.BASE else choice
                assert collect(channel)[0] == peft_greedy(peft_model, prompt, name, 6)
            wait_until(lambda: engine.kv_memory().lent_bytes == 0, what="the batch's KV back in the arena")
            stats = engine.kv_memory()
            assert stats.lent > 0 and stats.overflowed == 0
            touched.append(stats.touched_bytes)
        assert touched[1] == touched[0] > 0
    finally:
        engine.close()


def test_a_burst_over_two_adapters_prefills_one_run_per_adapter(
    base_model, tokenizer, adapter_dirs, peft_model, monkeypatch
):
    """Requests queued as math, poet, math, poet join in one step and are prefilled as math, math, poet, poet:
    the segmented route runs one matmul pair per adapter (scheduler.together), and each output is still its
    own greedy continuation."""
    from loramux.core.lora import routing
    from loramux.core.lora.segmented import SegmentedLinear

    prefills: list[tuple[int, int, int]] = []  # (rows, runs, adapters on the module) of each prefill route

    class Recorded(SegmentedLinear):
        def __init__(self, row_loras):
            super().__init__(row_loras)
            adapters = len({id(lo) for lo in row_loras if lo is not None})
            prefills.append((len(row_loras), len(self.runs), adapters))

    monkeypatch.setattr(routing, "SegmentedLinear", Recorded)
    stepped, queued, waited = threading.Event(), threading.Event(), []

    def hold_first_step(rows: int) -> None:  # the burst queues while the engine thread waits here
        if not waited:
            stepped.set()
            waited.append(queued.wait(30))

    eng = make_engine(base_model, tokenizer, adapter_dirs)
    eng._on_step = hold_first_step
    adapters = ["math", "poet", "math", "poet"]
    prompts = [[5 + i, 6 + i, 7 + i, 8 + i] for i in range(4)]
    try:
        first = eng.submit(GenerationRequest(prompt=[3, 4, 5], max_new_tokens=4, ignore_eos=True))
        assert stepped.wait(30), "the first request never reached a decode step"
        channels = [
            eng.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=6, ignore_eos=True))
            for p, a in zip(prompts, adapters, strict=True)
        ]
        queued.set()
        outputs = [collect(c)[0] for c in channels]
        collect(first)
    finally:
        eng.close()
    assert waited == [True]
    assert outputs == [peft_greedy(peft_model, p, a, 6) for p, a in zip(prompts, adapters, strict=True)]
    burst = [(runs, adapters) for rows, runs, adapters in prefills if rows == 4]
    assert burst and all(runs == adapters for runs, adapters in burst)  # interleaved: 4 (or 2) runs a module
    assert max(runs for runs, _ in burst) == 2  # modules both adapters target: math's two rows, then poet's
