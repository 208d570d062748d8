"""The generation API against the PEFT oracle and by hand: logprobs (generated, top-n, prompt), weighted adapter
mixes, min_new_tokens, stop token ids, presence/frequency penalties, min-p, chat messages and Tokenize."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from loramux.core import AdapterManager, AdapterSelection, Engine, EngineConfig, GenerationRequest, SamplingParams
from loramux.core.engine.processors import apply_presence_frequency
from loramux.core.engine.requests import ChatMessage, ChatPrompt, FinishReason
from loramux.core.engine.sampling import RowSampler, process_logits
from loramux.core.errors import AdapterNotFoundError, InvalidArgumentError, UnsupportedAdapterError
from tests.generation_fixtures import collect

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21]]


@pytest.fixture
def engine(base_model, tokenizer, adapter_dirs):
    model = copy.deepcopy(base_model)
    manager = AdapterManager(model)
    for name, path in adapter_dirs.items():
        manager.load_adapter(str(path), name)
    eng = Engine(model, tokenizer, manager, EngineConfig(max_batch_rows=8))
    yield eng
    eng.close()


def run(engine: Engine, **kwargs):
    events = list(engine.submit(GenerationRequest(**kwargs)))
    deltas, finished = events[:-1], events[-1]
    ids = [t for d in deltas for t in d.token_ids]
    logprobs = [lp for d in deltas for lp in d.logprobs]
    return ids, logprobs, finished


def peft_logits(peft_model, prompt: list[int], adapter: str | None, n: int) -> tuple[list[int], torch.Tensor]:
    """PEFT's greedy tokens and the raw logits (n, V) it chose them from."""
    kwargs = dict(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    kwargs.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(**kwargs)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(**kwargs)
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).float()


def test_logprobs_equal_peft_in_a_mixed_batch(engine, peft_model):
    choices = ["math", "poet", AdapterSelection.BASE, "math"]
    channels = [
        engine.submit(
            GenerationRequest(prompt=p, adapter=a, max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5)
        )
        for p, a in zip(PROMPTS, choices, strict=True)
    ]
    for channel, prompt, choice in zip(channels, PROMPTS, choices, strict=True):
        events = list(channel)
        ids = [t for e in events[:-1] for t in e.token_ids]
        logprobs = [lp for e in events[:-1] for lp in e.logprobs]
        want_ids, logits = peft_logits(peft_model, prompt, None if choice is AdapterSelection.BASE else choice, 6)
        assert ids == want_ids
        reference = torch.log_softmax(logits, dim=-1)
        assert [lp.token_id for lp in logprobs] == ids
        got = torch.tensor([lp.logprob for lp in logprobs])
        torch.testing.assert_close(got, reference.gather(1, torch.tensor(ids)[:, None])[:, 0], atol=1e-4, rtol=0)
        top = torch.topk(reference, 5, dim=-1)
        assert [[t.token_id for t in lp.top] for lp in logprobs] == top.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([[t.logprob for t in lp.top] for lp in logprobs]), top.values, atol=1e-4, rtol=0
        )


def test_requests_without_logprobs_get_none(engine):
    ids, logprobs, finished = run(engine, prompt=PROMPTS[0], adapter="math", max_new_tokens=4, ignore_eos=True)
    assert len(ids) == 4 and logprobs == [] and finished.prompt_logprobs == ()


@pytest.mark.parametrize("chunk", [512, 3])  # one-shot prefill, and a prompt prefilled 3 tokens per step
def test_prompt_logprobs_equal_peft(base_model, tokenizer, adapter_dirs, peft_model, chunk):
    model = copy.deepcopy(base_model)
    manager = AdapterManager(model)
    manager.load_adapter(str(adapter_dirs["poet"]), "poet")
    engine = Engine(model, tokenizer, manager, EngineConfig(prefill_chunk_tokens=chunk))
    try:
        prompt = PROMPTS[2]
        _, _, finished = run(
            engine, prompt=prompt, adapter="poet", max_new_tokens=2, prompt_logprobs=True, top_logprobs=2
        )
    finally:
        engine.close()
    peft_model.set_adapter("poet")
    with torch.no_grad():
        reference = torch.log_softmax(peft_model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    entries = finished.prompt_logprobs
    assert [e.token_id for e in entries] == prompt[1:]
    want = reference[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries]), want, atol=1e-4, rtol=0)
    assert [[t.token_id for t in e.top] for e in entries] == torch.topk(reference[:-1], 2).indices.tolist()


@pytest.fixture(scope="module")
def third_adapter(base_model, tmp_path_factory):
    """A third PEFT adapter of another rank (r=2 on o_proj and up_proj)."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("third") / "third"
    torch.manual_seed(33)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base_model), config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("members", [(("math", 0.7), ("poet", 0.3)), (("math", 1.5), ("poet", -0.5), ("third", 0.8))])
def test_a_weighted_mix_equals_peft_add_weighted_adapter_cat(engine, base_model, adapter_dirs, third_adapter, members):
    from peft import PeftModel

    engine.manager.load_adapter(str(third_adapter), "third")
    folders = {**adapter_dirs, "third": third_adapter}
    names = [n for n, _ in members]
    peft = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(folders[name]), name)
    peft.add_weighted_adapter(names, [w for _, w in members], "mix", combination_type="cat")
    peft.set_adapter("mix")
    plain = [
        engine.submit(GenerationRequest(prompt=p, adapter="poet", max_new_tokens=6, ignore_eos=True))
        for p in PROMPTS[:2]
    ]
    mixed = engine.submit(GenerationRequest(prompt=PROMPTS[2], adapter_mix=members, max_new_tokens=6, ignore_eos=True))
    ids, _, finished = collect(mixed)
    with torch.no_grad():
        out = peft.eval().generate(
            input_ids=torch.tensor([PROMPTS[2]]), max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
    assert ids == out[0, len(PROMPTS[2]) :].tolist()
    assert finished.adapter is None and [(m.name, m.weight) for m in finished.adapter_mix] == [
        (n, pytest.approx(w)) for n, w in members
    ]
    assert all(len(collect(c)[0]) == 6 for c in plain)
    assert engine.manager.list_adapters()[-1].name == "third"  # no new adapter was registered: math, poet, third
    assert [i.name for i in engine.manager.list_adapters()] == ["math", "poet", "third"]


@pytest.mark.parametrize(
    ("mix", "error"),
    [
        ((("math", 1.0),), InvalidArgumentError),
        ((("math", 1.0), ("math", 2.0)), InvalidArgumentError),
        ((("math", 1.0), ("poet", 0.0)), InvalidArgumentError),
        ((("math", 1.0), ("poet", math.inf)), InvalidArgumentError),
        ((("math", 1.0), ("poet", 11.0)), InvalidArgumentError),
        ((("math", 1.0), ("ghost", 1.0)), AdapterNotFoundError),
    ],
)
def test_bad_mixes_are_refused_and_hold_nothing(engine, mix, error):
    with pytest.raises(error) as err:
        engine.submit(GenerationRequest(prompt=[5, 6], adapter_mix=mix))
    assert err.value.field in ("adapter_mix", "adapter")
    assert engine.queued == 0
    assert all(a.users == 0 for a in engine.manager._t.residency)  # the claims were given back


def test_a_mix_with_modules_to_save_is_unsupported(engine, base_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base_model), config).save_pretrained(tmp_path / "saved")
    engine.manager.load_adapter(str(tmp_path / "saved"), "saved")
    channel = engine.submit(GenerationRequest(prompt=[5, 6], adapter_mix=(("math", 1.0), ("saved", 1.0))))
    with pytest.raises(UnsupportedAdapterError, match="modules_to_save cannot be mixed"):
        collect(channel)


def first_new(ids: list[int], *, after: int, besides: set[int] = frozenset()) -> int:
    """The index of the first token after ``after`` that did not occur before it (and is not in ``besides``)."""
    return next(k for k in range(after + 1, len(ids)) if ids[k] not in ids[:k] and ids[k] not in besides)


def test_min_new_tokens_holds_back_eos_and_stop_token_ids(engine, base_model, tokenizer, adapter_dirs):
    free, _, _ = run(engine, prompt=PROMPTS[1], adapter="math", max_new_tokens=12, ignore_eos=True)
    e = first_new(free, after=0)
    s = first_new(free, after=e, besides={free[e]})
    model = copy.deepcopy(base_model)
    model.generation_config.eos_token_id = free[e]  # a greedy token that comes at step e is this model's EOS
    manager = AdapterManager(model)
    manager.load_adapter(str(adapter_dirs["math"]), "math")
    eos_engine = Engine(model, tokenizer, manager, EngineConfig())
    try:
        early, _, finished = run(eos_engine, prompt=PROMPTS[1], adapter="math", max_new_tokens=12)
        assert finished.reason is FinishReason.EOS and early == free[:e] and finished.completion_tokens == e + 1
        held, _, finished = run(
            eos_engine,
            prompt=PROMPTS[1],
            adapter="math",
            max_new_tokens=12,
            min_new_tokens=s + 2,
            stop_token_ids=(free[s],),
        )
        assert finished.completion_tokens >= s + 2
        assert free[e] not in held[: s + 1] and free[s] not in held[: s + 1]  # neither could come before min_new
    finally:
        eos_engine.close()
    stopped, _, finished = run(
        engine, prompt=PROMPTS[1], adapter="math", max_new_tokens=12, ignore_eos=True, stop_token_ids=(free[s],)
    )
    assert finished.reason is FinishReason.STOP_TOKEN and finished.stop_token_id == free[s]
    assert stopped == free[:s] and finished.completion_tokens == s + 1  # the stop token itself is not streamed


def test_min_new_tokens_delays_stop_strings(engine, tokenizer):
    for adapter in ("math", "poet", AdapterSelection.BASE):
        for prompt in PROMPTS:
            ids, _, _ = run(engine, prompt=prompt, adapter=adapter, max_new_tokens=8, ignore_eos=True)
            text = tokenizer.decode(ids)
            clean = [
                text[i : i + 2]
                for i in range(len(text) - 1)
                if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip()
            ]
            if clean:
                break
        if clean:
            break
    stop = clean[0]
    _, _, early = run(engine, prompt=prompt, adapter=adapter, max_new_tokens=8, ignore_eos=True, stop=(stop,))
    _, _, late = run(
        engine, prompt=prompt, adapter=adapter, max_new_tokens=8, ignore_eos=True, stop=(stop,), min_new_tokens=8
    )
    assert early.reason is FinishReason.STOP_SEQUENCE and late.reason is FinishReason.LENGTH


def test_presence_and_frequency_penalties_follow_openai_by_hand():
    row = RowSampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[0, 0, 0])
    row.observe([1, 2, 2])  # the completion so far: 1 once, 2 twice (the prompt's 0s do not count)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    got = apply_presence_frequency(logits, [row])
    assert got.tolist() == [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 2 * 0.25, 1.0]]
    greedy = RowSampler(SamplingParams(frequency_penalty=2.0))
    greedy.observe([3])
    assert process_logits(torch.tensor([[0.0, 0.0, 0.0, 1.5]]), [greedy]).argmax().item() != 3  # greedy too


def test_min_p_keeps_tokens_near_the_top():
    from transformers.generation.logits_process import MinPLogitsWarper, TypicalLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    rows = [RowSampler(SamplingParams(temperature=0.7, min_p=0.2, typical_p=0.9)) for _ in range(3)]
    want = TypicalLogitsWarper(0.9)(None, MinPLogitsWarper(0.2)(None, logits / 0.7))
    torch.testing.assert_close(process_logits(logits, rows), want)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("sampling.presence_penalty", {"sampling": {"presence_penalty": 2.5}}),
        ("sampling.frequency_penalty", {"sampling": {"frequency_penalty": -3.0}}),
        ("sampling.min_p", {"sampling": {"min_p": 1.5}}),
        ("sampling.typical_p", {"sampling": {"typical_p": 0.0}}),
        ("top_logprobs", {"top_logprobs": 21}),
        ("stopping.min_new_tokens", {"min_new_tokens": 9, "max_new_tokens": 8}),
        ("stopping.stop_token_ids", {"stop_token_ids": (10_000,)}),
    ],
)
def test_out_of_range_options_name_their_field(engine, field, kwargs):
    with pytest.raises(InvalidArgumentError) as err:
        if "sampling" in kwargs:
            GenerationRequest(prompt=[5], sampling=SamplingParams(**kwargs.pop("sampling")))
        engine.submit(GenerationRequest(prompt=[5], **kwargs))
    assert err.value.field == field


TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_messages_render_as_the_tokenizer_does_and_tokenize_counts_them(base_model, tokenizer, adapter_dirs):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = TEMPLATE
    model = copy.deepcopy(base_model)
    engine = Engine(model, chat_tokenizer, AdapterManager(model), EngineConfig())
    try:
        messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Prove that"))
        want = chat_tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=True, add_generation_prompt=True
        )
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        request = GenerationRequest(prompt=ChatPrompt(messages), max_new_tokens=2, ignore_eos=True)
        assert engine.tokenize(request) == want
        _, _, finished = run(engine, prompt=ChatPrompt(messages), max_new_tokens=2, ignore_eos=True)
        assert finished.prompt_tokens == len(want)
        text = GenerationRequest(prompt="Prove that", apply_chat_template=True)
        assert engine.tokenize(text) == engine.tokenize(
            GenerationRequest(prompt=ChatPrompt((ChatMessage("user", "Prove that"),)))
        )
        assert (
            len(engine.tokenize(GenerationRequest(prompt="Prove that")))
            == run(engine, prompt="Prove that", max_new_tokens=1)[2].prompt_tokens
        )
        with pytest.raises(InvalidArgumentError, match="unknown message roles") as err:
            engine.tokenize(GenerationRequest(prompt=ChatPrompt((ChatMessage("robot", "hi"),))))
        assert err.value.field == "messages"
        with pytest.raises(InvalidArgumentError) as err:
            engine.tokenize(GenerationRequest(prompt=ChatPrompt(())))
        assert err.value.field == "messages"
    finally:
        engine.close()
    bare = copy.deepcopy(base_model)
    plain = Engine(bare, tokenizer, AdapterManager(bare), EngineConfig())
    try:
        with pytest.raises(InvalidArgumentError, match="no chat template") as err:
            plain.tokenize(GenerationRequest(prompt=ChatPrompt((ChatMessage("user", "hi"),))))
        assert err.value.field == "messages"
    finally:
        plain.close()
