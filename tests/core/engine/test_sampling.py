"""loramux.core.engine.sampling against transformers' own logits processors, plus validation and reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loramux.core import SamplingParams
from loramux.core.engine.sampling import RowSampler, process_logits, sample_next_tokens
from loramux.core.errors import InvalidArgumentError

# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": math.nan}, "sampling.temperature"),
        ({"temperature": math.inf}, "sampling.temperature"),
        ({"temperature": "hot"}, "sampling.temperature"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"top_k": 2.5}, "sampling.top_k"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": -0.5}, "sampling.top_p"),
        ({"top_p": 1.01}, "sampling.top_p"),
        ({"top_p": math.nan}, "sampling.top_p"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"repetition_penalty": -1.2}, "sampling.repetition_penalty"),
        ({"repetition_penalty": math.inf}, "sampling.repetition_penalty"),
        ({"seed": -1}, "sampling.seed"),
        ({"seed": 2**64}, "sampling.seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.0},
        {"temperature": 2, "top_k": 0, "top_p": 1.0},
        {"top_p": 1e-9, "repetition_penalty": 0.5},
        {"seed": 0},
        {"seed": 2**64 - 1},
    ],
)
def test_boundary_values_are_valid(kwargs: dict[str, object]) -> None:
    SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [({}, True), ({"temperature": 0}, True), ({"temperature": 0.0, "top_k": 5}, True), ({"temperature": 1}, False)],
)
def test_greedy_is_temperature_none_or_zero(kwargs: dict[str, object], greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ equality with HF


def _hf_processors(params: SamplingParams) -> LogitsProcessorList:
    """What GenerationMixin._get_logits_processor builds for these settings (num_beams=1)."""
    procs = LogitsProcessorList()
    rp = params.repetition_penalty
    if rp is not None and rp != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(rp)))
    if params.greedy:
        return procs
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(params.temperature)))  # type: ignore[arg-type]
    if params.top_k:
        procs.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
    if params.top_p is not None and params.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
    return procs


SETTINGS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(temperature=0.0, repetition_penalty=0.7),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.5, top_k=10),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_k=10_000),  # larger than V: keeps everything
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.05),
    SamplingParams(temperature=1.2, top_k=20, top_p=0.8, repetition_penalty=1.2),
    SamplingParams(temperature=0.5, top_k=5, top_p=0.95, repetition_penalty=0.9),
]


def _hf_rows(logits: Tensor, prompts: Tensor, settings: list[SamplingParams]) -> Tensor:
    """Each row through its own transformers processor list, on float32 copies (as generate() does)."""
    out = [_hf_processors(p)(prompts[i : i + 1], logits[i : i + 1].float().clone()) for i, p in enumerate(settings)]
    return torch.cat(out)


@pytest.mark.parametrize("params", SETTINGS, ids=repr)
def test_processed_scores_match_transformers(params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 3  # (N, V)
    prompts = torch.randint(0, 300, (4, 40), generator=gen)  # (N, L), repeats included
    rows = [RowSampler(params, prompt_ids=prompts[i].tolist()) for i in range(4)]
    ours = process_logits(logits, rows)
    torch.testing.assert_close(ours, _hf_rows(logits, prompts, [params] * 4), rtol=0, atol=0)


def test_mixed_batch_matches_transformers_row_by_row() -> None:
    """Every row of one batch carries different settings; the batched math equals the per-row HF one."""
    gen = torch.Generator().manual_seed(1)
    n = len(SETTINGS)
    logits = torch.randn(n, 500, generator=gen) * 2
    prompts = torch.randint(0, 520, (n, 30), generator=gen)  # some ids >= V: ignored, as in HF
    rows = [RowSampler(p, prompt_ids=prompts[i].tolist()) for i, p in enumerate(SETTINGS)]
    torch.testing.assert_close(process_logits(logits, rows), _hf_rows(logits, prompts, SETTINGS), rtol=0, atol=0)


def test_processor_order_matches_transformers_get_logits_processor() -> None:
    """Guards the order we copied: transformers itself builds penalty -> temperature -> top-k -> top-p."""
    model = _tiny_model()
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3)
    ids = torch.randint(0, 64, (1, 6))
    procs = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=ids.shape[1],
        logits_processor=LogitsProcessorList(),
        device="cpu",
        model_kwargs={"attention_mask": torch.ones_like(ids)},
    )
    assert [type(p) for p in procs] == [
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    ]
    logits = torch.randn(1, 64) * 3
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3)
    ours = process_logits(logits, [RowSampler(params, prompt_ids=ids[0].tolist())])
    torch.testing.assert_close(ours, procs(ids, logits.clone()), rtol=0, atol=0)


def _tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=64, initializer_range=0.5,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("penalty", [None, 1.5, 0.6])
def test_greedy_decode_matches_generate(penalty: float | None) -> None:
    """End to end: our greedy loop (penalty over prompt + generated) equals model.generate(do_sample=False)."""
    model = _tiny_model()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
        repetition_penalty=penalty, pad_token_id=0,
    )  # fmt: skip
    rows = [RowSampler(SamplingParams(repetition_penalty=penalty), prompt_ids=p.tolist()) for p in prompt]
    ids = prompt
    with torch.no_grad():
        for _ in range(16):
            next_ids = sample_next_tokens(model(ids).logits[:, -1, :], rows)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
    assert torch.equal(ids, expected)


# ------------------------------------------------------------------------------------------ greedy paths


def test_plain_greedy_is_argmax() -> None:
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(2))
    rows = [RowSampler(SamplingParams(temperature=0.0 if i % 2 else None, top_k=3)) for i in range(8)]
    assert torch.equal(sample_next_tokens(logits, rows), logits.argmax(dim=-1))


def test_greedy_rows_mixed_with_sampled_rows_are_argmax() -> None:
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(4)) * 4
    rows = [RowSampler(SamplingParams(temperature=1.0 if i % 2 else None, seed=i)) for i in range(6)]
    picks = sample_next_tokens(logits, rows)
    assert torch.equal(picks[0::2], logits[0::2].argmax(dim=-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.3, top_k=1, seed=5),
        SamplingParams(temperature=2.0, top_p=1e-9, seed=6),
        SamplingParams(temperature=0.9, top_k=50, top_p=1e-6, seed=7),
    ],
    ids=repr,
)
def test_degenerate_sampling_is_greedy(params: SamplingParams) -> None:
    """top_k=1 or a tiny top_p leave only the top token (min_tokens_to_keep=1): sampling returns argmax."""
    gen = torch.Generator().manual_seed(8)
    row = RowSampler(params)
    for _ in range(20):
        logits = torch.randn(1, 300, generator=gen)
        assert sample_next_tokens(logits, [row]).item() == logits.argmax().item()


# -------------------------------------------------------------------------------- sampling distribution


def test_draws_follow_the_processed_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=4, seed=11)
    expected = process_logits(logits, [RowSampler(params)]).softmax(dim=-1)[0]  # (V,)
    row = RowSampler(params)
    draws = torch.tensor([sample_next_tokens(logits, [row]).item() for _ in range(20_000)])
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[4:].sum() == 0  # filtered by top_k: never drawn
    torch.testing.assert_close(freq, expected.double(), atol=0.015, rtol=0)


def test_overflowing_temperature_falls_back_to_argmax() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(9)) * 10
    rows = [RowSampler(SamplingParams(temperature=1e-300, seed=1)) for _ in range(2)]
    assert torch.equal(sample_next_tokens(logits, rows), logits.argmax(dim=-1))


# ------------------------------------------------------------------------------------- reproducibility


def _step_logits(key: int, step: int, vocab: int = 256) -> Tensor:
    """Logits that depend only on (request, step): what a row would see whatever its batch."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(key * 10_000 + step)) * 2


def _decode(requests: list[tuple[int, SamplingParams]], steps: int) -> list[list[int]]:
    rows = [RowSampler(p, prompt_ids=[1, 2, 3]) for _, p in requests]
    out: list[list[int]] = [[] for _ in requests]
    for t in range(steps):
        logits = torch.stack([_step_logits(key, t) for key, _ in requests])  # (N, V)
        for i, tok in enumerate(sample_next_tokens(logits, rows).tolist()):
            out[i].append(tok)
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=1234),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=99),
    ],
    ids=repr,
)
def test_seeded_row_is_independent_of_its_batch(params: SamplingParams) -> None:
    alone = _decode([(0, params)], steps=60)[0]
    others = [
        (1, SamplingParams(temperature=1.0, seed=7)),
        (2, SamplingParams()),
        (3, SamplingParams(temperature=1.3, top_p=0.5, repetition_penalty=1.1)),  # unseeded
    ]
    for position in range(4):
        batch = [*others[:position], (0, params), *others[position:]]
        assert _decode(batch, steps=60)[position] == alone
    assert _decode([(0, params)], steps=60)[0] == alone
    assert len(set(alone)) > 5  # really sampling, not a constant


def test_different_seeds_differ_and_unseeded_rows_get_a_seed() -> None:
    a = _decode([(0, SamplingParams(temperature=1.0, seed=1))], steps=40)[0]
    b = _decode([(0, SamplingParams(temperature=1.0, seed=2))], steps=40)[0]
    assert a != b
    row = RowSampler(SamplingParams(temperature=1.0))
    assert isinstance(row.seed, int)
    replay = _decode([(0, SamplingParams(temperature=1.0, seed=row.seed))], steps=40)[0]
    assert replay == _decode([(0, SamplingParams(temperature=1.0, seed=row.seed))], steps=40)[0]


def test_picks_are_recorded_for_the_repetition_penalty() -> None:
    """sample_next_tokens observes its picks: step 2 penalizes the token picked at step 1, as HF would."""
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    row = RowSampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[3])
    assert sample_next_tokens(logits, [row]).item() == 0
    assert sample_next_tokens(logits, [row]).item() == 1  # 3.0 / 2 < 2.9
    assert sample_next_tokens(logits, [row]).item() == 0  # both seen: 1.5 > 1.45


def test_observe_before_and_after_first_step() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.8, 0.7]])
    row = RowSampler(SamplingParams(repetition_penalty=10.0))
    row.observe(0)
    assert sample_next_tokens(logits, [row]).item() == 1
    row.observe(torch.tensor([2, 3]))
    assert sample_next_tokens(logits, [row]).item() == 0  # 0,1,2,3 all seen: back to 0.1 > 0.09 > ...


def test_callers_logits_are_not_modified() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(12))
    before = logits.clone()
    rows = [RowSampler(SETTINGS[-1], prompt_ids=range(50)) for _ in range(3)]
    for _ in range(3):
        sample_next_tokens(logits, rows)
        process_logits(logits, rows)
    assert torch.equal(logits, before)


def test_rejects_logits_that_do_not_match_rows() -> None:
    with pytest.raises(ValueError, match="rows"):
        sample_next_tokens(torch.zeros(3, 10), [RowSampler(SamplingParams())])
