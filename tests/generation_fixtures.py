"""The tiny generation set-up shared by the engine, service, client and polyglot tests.

Nothing is downloaded: a seeded Llama (hidden 32, 2 layers, vocab 320), a byte-level BPE tokenizer trained here
on a few lines that include multi-byte characters, and two PEFT-made adapters ("math": all-linear r=4; "poet":
q/v/down r=8) in a temporary folder. Import the fixtures into a conftest or test module to use them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loramux.core import Finished, GenerationEvent, TokenDelta

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Prove that the sum of two even numbers is even.",
    "Roses are red, violets are blue; Café naïve 中文 🙂.",
    "Café, naïve façade, Straße — 中文字符 and emoji 🙂🎉 in one line.",
    "def main():\n    return 42  # the answer",
] * 40
VOCAB = 320
ADAPTERS = {"math": ("all-linear", 4), "poet": (["q_proj", "v_proj", "down_proj"], 8)}


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def adapter_dirs(base_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, (name, (targets, rank)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        config = LoraConfig(r=rank, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base_model), config).save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def peft_model(base_model: LlamaForCausalLM, adapter_dirs: dict[str, Path]):
    """The oracle: PEFT with both adapters loaded ("math" and "poet"), for greedy-parity checks."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dirs["math"]), adapter_name="math")
    model.load_adapter(str(adapter_dirs["poet"]), "poet")
    return model.eval()


def collect(events: Iterable[GenerationEvent]) -> tuple[list[int], str, Finished]:
    """An engine request's stream, gathered: (token ids, text, the Finished event)."""
    ids: list[int] = []
    text, finished = "", None
    for event in events:
        if isinstance(event, TokenDelta):
            ids += event.token_ids
            text += event.text
        else:
            finished = event
    assert finished is not None
    return ids, text, finished
