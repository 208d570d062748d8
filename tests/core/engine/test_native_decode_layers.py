"""The engine on native decode layers: greedy tokens equal to PEFT's on base, mixed and one-adapter batches,
the grouped kernel's LoRA adds inside the native calls, and what start chose kept for the bench."""

from __future__ import annotations

import pytest

from loramux.core import AdapterSelection, GenerationRequest
from loramux.core.lora.kernel_choice import LoraKernel
from loramux.core.model.native_layer_choice import NativeLayerChoice
from loramux.core.model.native_layers import DecodeLayers, NativeDecodeLayers, NativeLoras, native_layers
from tests.conftest import build_base
from tests.core.engine.test_engine import PROMPTS, make_engine, peft_greedy
from tests.generation_fixtures import collect

pytestmark = pytest.mark.skipif(
    isinstance(native_layers(build_base("llama")), str), reason="native decode layers cannot run on this machine"
)


@pytest.mark.parametrize(
    ("layers", "lora"),
    [
        (DecodeLayers.NATIVE, LoraKernel.NATIVE),
        (DecodeLayers.NATIVE, LoraKernel.TORCH),
        (DecodeLayers.AUTO, LoraKernel.AUTO),
    ],
)
def test_base_and_mixed_batches_equal_peft_greedy(
    layers, lora, base_model, tokenizer, adapter_dirs, peft_model, monkeypatch
):
    calls: list[int] = []  # layers run native: the whole layer in one call, or its last call of two
    for name in ("attention_output_and_mlp", "whole_layer"):
        original = getattr(NativeDecodeLayers, name)
        monkeypatch.setattr(
            NativeDecodeLayers, name, lambda s, i, *a, original=original: calls.append(i) or original(s, i, *a)
        )
    inside: list[bool] = []  # per routed layer call: were its LoRA adds inside the native calls?
    routes_of = NativeDecodeLayers.routes_of

    def spy(self, index, rows, routes, x):
        lora = routes_of(self, index, rows, routes, x)
        if routes:
            inside.append(isinstance(lora, NativeLoras))
        return lora

    monkeypatch.setattr(NativeDecodeLayers, "routes_of", spy)
    engine = make_engine(base_model, tokenizer, adapter_dirs, decode_layers=layers, lora_kernel=lora)
    try:
        choice = engine.decoder.native_choice
        assert isinstance(choice, NativeLayerChoice), choice
        assert (choice.timings == ()) == (layers is DecodeLayers.NATIVE)
        base = [
            engine.submit(GenerationRequest(prompt=p, adapter=AdapterSelection.BASE, max_new_tokens=8, ignore_eos=True))
            for p in PROMPTS
        ]
        for prompt, channel in zip(PROMPTS, base, strict=True):
            assert collect(channel)[0] == peft_greedy(peft_model, prompt, None, 8)
        if layers is DecodeLayers.NATIVE:
            assert calls, "the base batch ran the native layers"
        for mixed in (["math", AdapterSelection.BASE, "poet"], ["poet"] * 3):  # grouped, then uniform routes
            calls.clear()
            inside.clear()
            channels = [
                engine.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=8, ignore_eos=True))
                for p, a in zip(PROMPTS, mixed, strict=False)
            ]
            for prompt, adapter, channel in zip(PROMPTS, mixed, channels, strict=False):
                name = None if adapter is AdapterSelection.BASE else adapter
                assert collect(channel)[0] == peft_greedy(peft_model, prompt, name, 8)
            if layers is DecodeLayers.NATIVE and lora is LoraKernel.NATIVE:
                assert calls, "the grouped kernel's routes add into their outputs: native layers"
                assert inside and all(inside), "the grouped kernel's adds run inside the native calls"
    finally:
        engine.close()
