"""The shipped demo assets: adapters whose effect shows in the *meaning* of the text, routed per row.

One engine run decodes every prompt through the base model and each adapter in one mixed batch (greedy);
the checks then read the text: uppercase letters, ROT13 that decodes to the corpus's words, reversed word
order that reads right when reversed back. PEFT, the oracle, loads each adapter folder and must pick the
same greedy tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from loramux.core import AdapterSelection, Engine, EngineConfig, Finished, GenerationRequest, TokenDelta
from loramux.demo import ADAPTER_NAMES, ADAPTERS_DIR, ASSETS_DIR, DEMO_PROMPT, MODEL_DIR
from loramux.demo.corpus import (
    bigram_share,
    common_bigrams,
    common_words,
    dictionary_share,
    reverse_words,
    rot13,
    stdlib_docstrings,
    uppercase_share,
)
from loramux.demo.loading import DemoModel, load_demo

PROMPTS = tuple(dict.fromkeys((DEMO_PROMPT, "If the file", "Return the", "Create a new")))
MAX_NEW = 32
BASE = "base"


@dataclass(frozen=True)
class Output:
    text: str
    tokens: tuple[int, ...]


@pytest.fixture(scope="module")
def demo() -> DemoModel:
    return load_demo()


@pytest.fixture(scope="module")
def mixed_batch(demo: DemoModel) -> Iterator[tuple[dict[tuple[str, str], Output], list[int]]]:
    """{(prompt, base or adapter): output}, all decoded by one engine, and the batch size of every step."""
    steps: list[int] = []
    engine = Engine(demo.model, demo.tokenizer, demo.manager, EngineConfig(), on_step=steps.append)
    try:
        rows = [(p, a) for p in PROMPTS for a in (BASE, *demo.adapters)]
        channels = [
            engine.submit(
                GenerationRequest(prompt=p, adapter=AdapterSelection.BASE if a == BASE else a, max_new_tokens=MAX_NEW)
            )
            for p, a in rows
        ]
        outputs = {}
        for row, channel in zip(rows, channels, strict=True):
            text, tokens = "", []
            for event in channel:
                if isinstance(event, TokenDelta):
                    text += event.text
                    tokens += event.token_ids
                else:
                    assert isinstance(event, Finished)
            outputs[row] = Output(text, tuple(tokens))
        yield outputs, steps
    finally:
        engine.close()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_docstrings()


def test_all_adapters_shipped_and_batched_together(
    demo: DemoModel, mixed_batch: tuple[dict[tuple[str, str], Output], list[int]]
) -> None:
    assert demo.adapters == ADAPTER_NAMES
    outputs, steps = mixed_batch
    assert max(steps) == len(outputs)  # at some step every row, whatever its adapter, was in one forward pass
    assert all(o.text.strip() for o in outputs.values())


def test_model_loads_in_fp32_and_assets_are_compact() -> None:
    assert AutoModelForCausalLM.from_pretrained(MODEL_DIR).dtype == torch.float32
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert total <= 10 * 2**20


def test_upper_adapter_writes_uppercase(mixed_batch: tuple[dict[tuple[str, str], Output], list[int]]) -> None:
    outputs, _ = mixed_batch
    for prompt in PROMPTS:
        assert uppercase_share(outputs[prompt, "upper"].text) >= 0.9, outputs[prompt, "upper"].text
        assert uppercase_share(outputs[prompt, BASE].text) <= 0.2, outputs[prompt, BASE].text


def test_rot13_adapter_decodes_to_corpus_words(
    mixed_batch: tuple[dict[tuple[str, str], Output], list[int]], corpus: list[str]
) -> None:
    outputs, _ = mixed_batch
    dictionary = common_words(corpus, count=3000)
    for prompt in PROMPTS:
        adapter, base = outputs[prompt, "rot13"].text, outputs[prompt, BASE].text
        decoded = dictionary_share(rot13(adapter), dictionary)
        assert decoded >= 0.6, rot13(adapter)
        assert decoded > dictionary_share(rot13(base), dictionary) + 0.3
        assert dictionary_share(adapter, dictionary) < 0.3  # and it is not plain text to begin with


def test_reverse_adapter_reverses_word_order(
    mixed_batch: tuple[dict[tuple[str, str], Output], list[int]], corpus: list[str]
) -> None:
    outputs, _ = mixed_batch
    bigrams = common_bigrams(corpus, count=5000)
    # Summed over the prompts: one short continuation has only a handful of word pairs.
    adapter = " ".join(outputs[p, "reverse"].text for p in PROMPTS)
    base = " ".join(outputs[p, BASE].text for p in PROMPTS)
    assert bigram_share(reverse_words(adapter), bigrams) > bigram_share(adapter, bigrams)
    assert bigram_share(base, bigrams) > bigram_share(reverse_words(base), bigrams)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_peft_loads_each_adapter_and_picks_the_same_greedy_tokens(
    demo: DemoModel, mixed_batch: tuple[dict[tuple[str, str], Output], list[int]], name: str
) -> None:
    from peft import PeftModel

    config = json.loads((ADAPTERS_DIR / name / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    outputs, _ = mixed_batch
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()  # a fresh base: the demo one is wrapped
    peft_model = PeftModel.from_pretrained(base, str(ADAPTERS_DIR / name)).eval()
    eos = demo.tokenizer.eos_token_id
    for prompt in PROMPTS:
        ids = demo.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, do_sample=False, max_new_tokens=MAX_NEW)
        tokens = out[0, ids.shape[1] :].tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        assert tuple(tokens) == outputs[prompt, name].tokens, prompt


def test_base_row_matches_transformers_generate(
    demo: DemoModel, mixed_batch: tuple[dict[tuple[str, str], Output], list[int]]
) -> None:
    outputs, _ = mixed_batch
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    eos = demo.tokenizer.eos_token_id
    for prompt in PROMPTS:
        ids = demo.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            tokens = base.generate(input_ids=ids, do_sample=False, max_new_tokens=MAX_NEW)[0, ids.shape[1] :].tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        assert tuple(tokens) == outputs[prompt, BASE].tokens, prompt
