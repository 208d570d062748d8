"""Ragged decode attention: runs of rows that cover every row, the same outputs as SDPA over the padding."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import loramux.core.engine.engine as engine_module
from loramux.core import GenerationRequest
from loramux.core.model.kv_batch import prefill_positions
from loramux.core.model.ragged_attention import SEGMENTS_KWARG, decode_segments, use_ragged_attention
from tests.conftest import build_base
from tests.core.engine.test_engine import make_engine, peft_greedy
from tests.generation_fixtures import VOCAB, collect


def test_only_models_on_sdpa_are_switched() -> None:
    eager = build_base("llama")
    eager.set_attn_implementation("eager")
    assert not use_ragged_attention(eager) and eager.config._attn_implementation == "eager"


def test_rows_of_one_length_keep_plain_sdpa() -> None:
    assert decode_segments([50] * 8, 50) is None
    assert decode_segments([5, 300], 300) is None  # two calls cost more than the padding they skip


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        ([40] * 8 + [1600], [(0, 8, 40), (8, 9, 1600)]),  # a long prompt joined at the end
        ([40] * 3 + [1600] + [40] * 4, [(0, 3, 40), (3, 4, 1600), (4, 8, 40)]),
        ([30] * 4 + [900] * 2 + [20] * 4, [(0, 4, 30), (4, 6, 900), (6, 10, 20)]),
    ],
)
def test_a_long_row_gets_a_run_of_its_own(lengths: list[int], expected: list[tuple[int, int, int]]) -> None:
    assert decode_segments(lengths, max(lengths)) == expected


def test_runs_cover_every_row_once_and_are_wide_enough() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.choice([rng.randint(1, 60), rng.randint(200, 2000)]) for _ in range(rng.randint(1, 70))]
        segments = decode_segments(lengths, max(lengths))
        if segments is None:
            continue
        assert [s[0] for s in segments] == [0, *(s[1] for s in segments[:-1])] and segments[-1][1] == len(lengths)
        for first, stop, width in segments:
            assert first < stop and width == max(lengths[first:stop])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("long_row", [3, 1])
def test_decode_step_equals_sdpa_over_the_padding(arch: str, long_row: int) -> None:
    """Left-padded rows of 5 tokens and one of 50: one decode step, runs vs one SDPA call over all columns."""
    model = build_base(arch)
    ragged = copy.deepcopy(model)
    assert use_ragged_attention(ragged)
    lengths = [5, 5, 5, 5]
    lengths[long_row] = 50  # within the gpt2 test model's 64 positions
    width = max(lengths)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 100, (4, width), generator=generator)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    step_ids = torch.randint(3, 100, (4, 1), generator=generator)
    step_mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], dim=1)
    step_positions = step_mask.sum(1, keepdim=True) - 1
    segments = []  # runs of equal length, each attending to exactly its rows' columns
    for row, n in enumerate(lengths):
        if segments and lengths[segments[-1][0]] == n:
            segments[-1] = (segments[-1][0], row + 1, n + 1)
        else:
            segments.append((row, row + 1, n + 1))
    assert len(segments) >= 2
    logits = []
    with torch.no_grad():
        for m, extra in ((model, {}), (ragged, {SEGMENTS_KWARG: segments})):
            cache = m(input_ids=ids, attention_mask=mask, position_ids=prefill_positions(mask)).past_key_values
            out = m(
                input_ids=step_ids,
                attention_mask=step_mask,
                position_ids=step_positions,
                past_key_values=cache,
                **extra,
            )
            logits.append(out.logits[:, -1])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_engine_decodes_a_long_prompt_beside_short_ones_like_peft(
    base_model, tokenizer, adapter_dirs, peft_model, monkeypatch
) -> None:
    """The ragged runs are used while a 300-token prompt decodes with short ones; greedy output is PEFT's."""
    used: list[list[tuple[int, int, int]]] = []

    def spy(lengths, width, **kwargs):  # type: ignore[no-untyped-def]
        segments = decode_segments(lengths, width, **kwargs)
        if segments is not None:
            used.append(segments)
        return segments

    monkeypatch.setattr(engine_module, "decode_segments", spy)
    long_prompt = [(11 * i + 7) % (VOCAB - 10) + 5 for i in range(300)]
    short_prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    engine = make_engine(base_model, tokenizer, adapter_dirs, max_prompt_tokens=512)
    try:
        channels = [
            engine.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=12, ignore_eos=True))
            for p, a in zip([*short_prompts, long_prompt], ["math", "poet", None, "math"], strict=True)
        ]
        outputs = [collect(c)[0] for c in channels]
    finally:
        engine.close()
    assert used, "the long row should have been given a run of its own"
    for prompt, adapter, got in zip(
        [*short_prompts, long_prompt], ["math", "poet", None, "math"], outputs, strict=True
    ):
        assert got == peft_greedy(peft_model, prompt, adapter, 12)


def test_engine_switches_its_model_unless_configured_not_to(base_model, tokenizer, adapter_dirs) -> None:
    for ragged, expected in ((True, "loramux_ragged"), (False, "sdpa")):
        engine = make_engine(base_model, tokenizer, adapter_dirs, ragged_attention=ragged)
        try:
            assert engine.model.config._attn_implementation == expected
        finally:
            engine.close()


def test_a_model_already_switched_stays_ragged_for_the_next_engine() -> None:
    model = build_base("llama")
    assert use_ragged_attention(model) and use_ragged_attention(model)
    assert model.config._attn_implementation == "loramux_ragged"


def test_a_model_the_probe_rejects_stays_on_sdpa(monkeypatch, caplog) -> None:
    import loramux.core.model.ragged_attention as ragged_attention

    monkeypatch.setattr(ragged_attention, "_probe", lambda model: "a decode step with runs differs")
    model = build_base("llama")
    with caplog.at_level("INFO", logger="loramux.core.model.ragged_attention"):
        assert not use_ragged_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert "ragged decode attention not used" in caplog.text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_pass_the_probe(dtype: torch.dtype) -> None:
    model = build_base("llama").to(dtype)
    assert use_ragged_attention(model) and model.config._attn_implementation == "loramux_ragged"
