"""loramux.core.adapters.export: a fresh adapter is a no-op PEFT loads; a trained one exports to what PEFT computes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from loramux.core import AdapterManager
from loramux.core.adapters.export import export_adapter, lora_config, write_initial_adapter

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(2, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def _peft_logits(base: LlamaForCausalLM, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_initial_adapter_is_peft_format_and_a_no_op(tiny: LlamaForCausalLM, tmp_path: Path) -> None:
    config = lora_config(r=4, lora_alpha=8, target_modules=TARGETS)
    folder = write_initial_adapter(tiny, tmp_path / "init", config=config, seed=3)
    state = load_file(str(folder / "adapter_model.safetensors"))
    assert len(state) == 2 * len(TARGETS) * 2  # A and B, per target, per layer
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (4, 32) and a.abs().max() <= 1 / 32**0.5 and a.std() > 0  # kaiming-uniform bound
    assert all(not t.any() for k, t in state.items() if "lora_B" in k)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    ids = _ids()
    with torch.no_grad():
        expected = tiny(input_ids=ids).logits
    torch.testing.assert_close(_peft_logits(tiny, folder, ids), expected)


def test_seed_decides_the_initial_weights(tiny: LlamaForCausalLM, tmp_path: Path) -> None:
    config = lora_config(r=2, lora_alpha=2, target_modules=TARGETS)
    first = load_file(
        str(write_initial_adapter(tiny, tmp_path / "a", config=config, seed=5) / "adapter_model.safetensors")
    )
    again = load_file(
        str(write_initial_adapter(tiny, tmp_path / "b", config=config, seed=5) / "adapter_model.safetensors")
    )
    other = load_file(
        str(write_initial_adapter(tiny, tmp_path / "c", config=config, seed=6) / "adapter_model.safetensors")
    )
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_trained_adapter_exports_to_what_peft_computes(tiny: LlamaForCausalLM, tmp_path: Path) -> None:
    model = copy.deepcopy(tiny)
    model.requires_grad_(False)
    manager = AdapterManager(model)
    config = lora_config(r=4, lora_alpha=8, target_modules=TARGETS, base_model_name_or_path="tiny")
    folder = write_initial_adapter(model, tmp_path / "init", config=config, seed=0)
    manager.load_adapter(str(folder), "trained", is_trainable=True)
    adapter = manager.acquire("trained")
    assert adapter is not None
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    ids = _ids()
    for _ in range(3):  # loramux's trainable path: rows routed to the adapter, gradients into its tensors
        with manager.routing(["trained", "trained", "trained"]):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = export_adapter(adapter, tmp_path / "out", config_updates={"base_model_name_or_path": "elsewhere"})
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "elsewhere"
    with torch.no_grad(), manager.routing(["trained", None, "trained"]):
        ours = model(input_ids=ids).logits
    with torch.no_grad():
        bare = tiny(input_ids=ids).logits
    theirs = _peft_logits(tiny, out, ids)
    assert not torch.allclose(theirs, bare, atol=1e-3)  # training changed something
    torch.testing.assert_close(ours[[0, 2]], theirs[[0, 2]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], bare[1], rtol=1e-4, atol=1e-5)


def test_export_can_cast_and_a_wrapped_model_still_gets_base_names(tiny: LlamaForCausalLM, tmp_path: Path) -> None:
    model = copy.deepcopy(tiny)
    manager = AdapterManager(model)
    config = lora_config(r=2, lora_alpha=4, target_modules=TARGETS)
    manager.load_adapter(str(write_initial_adapter(model, tmp_path / "a", config=config, seed=0)), "a")
    # The model is wrapped now; a second initial adapter must still use the base's own module names.
    second = write_initial_adapter(model, tmp_path / "b", config=config, seed=1)
    assert set(load_file(str(second / "adapter_model.safetensors"))) == set(
        load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    )
    adapter = manager.acquire("a")
    assert adapter is not None
    half = export_adapter(adapter, tmp_path / "half", dtype=torch.float16)
    assert {t.dtype for t in load_file(str(half / "adapter_model.safetensors")).values()} == {torch.float16}
