"""The device and dtype paths: bf16 bases, torch_device, ephemeral_gpu_offload, the engine on an accelerator.

Each test runs on the CPU here and again on CUDA where a GPU exists (the "cuda" cases skip, saying so,
without one), so a session with a GPU checks the CUDA path with `pytest -m gpu`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from loramux.core import AdapterManager, Engine, EngineConfig, GenerationRequest, TokenDelta
from tests.conftest import input_ids, peft_model_for, peft_row_logits, routed_logits, sfx

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base_mixed_batch_matches_peft(device, base_models, make_adapter):
    """A bf16 base: LoRA computed in fp32 (autocast), added, cast once, as PEFT does; bf16 tolerance."""
    arch = "llama"
    paths = {
        "one": make_adapter(arch, "one", seed=2000, target_modules=[sfx(arch, "qkv"), sfx(arch, "down")]),
        "two": make_adapter(arch, "two", seed=2001, r=8, target_modules="all-linear"),
    }
    base = copy.deepcopy(base_models[arch]).to(device=device, dtype=torch.bfloat16)
    model = copy.deepcopy(base)
    manager = AdapterManager(model)
    for name, path in paths.items():
        manager.load_adapter(str(path), name)
    assert all(t.dtype == torch.float32 for t in manager.acquire("one").weights.tensors())
    rows = ["one", None, "two", "one"]
    ids = input_ids(len(rows)).to(device)
    got = routed_logits(model, manager, ids, rows)
    expected = peft_row_logits(peft_model_for(base, paths), ids, rows)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", ["torch_device", "ephemeral_gpu_offload"])
def test_load_options_leave_weights_with_the_base_and_outputs_unchanged(device, option, base_models, make_adapter):
    """torch_device only says where the file is read; ephemeral_gpu_offload only where casts happen. Either
    way the weights end on the base layer's device (the CPU here) and the outputs are the same."""
    arch = "qwen2"
    path = make_adapter(arch, "opt", seed=2100, target_modules=[sfx(arch, "qkv"), sfx(arch, "down")])
    plain_model, option_model = copy.deepcopy(base_models[arch]), copy.deepcopy(base_models[arch])
    plain, with_option = AdapterManager(plain_model), AdapterManager(option_model)
    plain.load_adapter(str(path), "opt")
    kwargs = {"torch_device": device} if option == "torch_device" else {"ephemeral_gpu_offload": True}
    with_option.load_adapter(str(path), "opt", **kwargs)
    assert all(t.device.type == "cpu" for t in with_option.acquire("opt").weights.tensors())
    ids = input_ids(2)
    torch.testing.assert_close(
        routed_logits(option_model, with_option, ids, ["opt", None]),
        routed_logits(plain_model, plain, ids, ["opt", None]),
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_engine_greedy_matches_peft_generate_on_the_device(device, base_model, tokenizer, adapter_dirs):
    base = copy.deepcopy(base_model).to(device)
    model = copy.deepcopy(base)
    manager = AdapterManager(model)
    for name, path in adapter_dirs.items():
        manager.load_adapter(str(path), name)
    engine = Engine(model, tokenizer, manager, EngineConfig())
    peft_model = peft_model_for(base, dict(adapter_dirs))
    prompts = {"math": [5, 6, 7, 8], "poet": [9, 10, 11]}
    try:
        channels = {
            name: engine.submit(GenerationRequest(prompt=p, adapter=name, max_new_tokens=8, ignore_eos=True))
            for name, p in prompts.items()
        }
        for name, channel in channels.items():
            got = [t for event in channel if isinstance(event, TokenDelta) for t in event.token_ids]
            peft_model.set_adapter(name)
            with torch.no_grad():
                out = peft_model.generate(
                    input_ids=torch.tensor([prompts[name]], device=device),
                    max_new_tokens=8,
                    min_new_tokens=8,
                    do_sample=False,
                )
            assert got == out[0, len(prompts[name]) :].tolist()
    finally:
        engine.close()
