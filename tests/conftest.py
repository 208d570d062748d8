"""Shared fixtures: tiny seeded base models of three architectures and PEFT-made adapters.

Nothing is downloaded. Each base model is built once per session from a config with seeded random weights, and
every test gets its own deep copy (loramux wraps the model it is given in place). Adapters are written by PEFT
itself (``get_peft_model(...).save_pretrained``) with ``init_lora_weights=False`` so that every LoRA tensor is
non-zero, with a different seed per adapter. PEFT is the test oracle only: core/ never imports it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# The tiny generation set-up (tokenizer, base_model, adapter_dirs) for engine, service and client tests.
pytest_plugins = ["tests.generation_fixtures"]

ARCHS = ("llama", "gpt2", "qwen2")
VOCAB = 128
SEQ_LEN = 6

# Where the interesting modules of each architecture live. Roles: "qkv" (attention input projection; GPT-2's
# fused Conv1D c_attn), "o" (attention output), "up" (MLP input), "down" (MLP output). ``sfx`` is a suffix
# that names exactly that role in every layer (GPT-2 has two c_proj, so it needs the parent too).
_LLAMA_LIKE = {
    "layers": "model.layers",
    "layers_pattern": "layers",
    "embed": "embed_tokens",
    "embed_full": "model.embed_tokens",
    "path": {
        "qkv": "self_attn.q_proj",
        "o": "self_attn.o_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
        "v": "self_attn.v_proj",
    },
    "sfx": {"qkv": "q_proj", "o": "o_proj", "up": "up_proj", "down": "down_proj", "v": "v_proj"},
}
LAYOUT: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": {
        "layers": "transformer.h",
        "layers_pattern": "h",
        "embed": "wte",
        "embed_full": "transformer.wte",
        "path": {
            "qkv": "attn.c_attn",
            "o": "attn.c_proj",
            "up": "mlp.c_fc",
            "down": "mlp.c_proj",
            "v": "attn.c_proj",
        },
        "sfx": {"qkv": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj", "v": "attn.c_proj"},
    },
}


def full_name(arch: str, role: str, layer: int) -> str:
    """The dotted module name of ``role`` in layer ``layer``, e.g. model.layers.0.self_attn.q_proj."""
    lay = LAYOUT[arch]
    return f"{lay['layers']}.{layer}.{lay['path'][role]}"


def sfx(arch: str, role: str) -> str:
    return LAYOUT[arch]["sfx"][role]


def build_base(arch: str, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    """A tiny causal LM with seeded random weights, in eval mode, fp32."""
    torch.manual_seed(seed)
    decoder = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch in decoder:
        config_class, model_class = decoder[arch]
        config = config_class(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model: nn.Module = model_class(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    return model.eval()


def pytest_configure(config: pytest.Config) -> None:
    # Never reach for the network: a Hub lookup is answered from a local cache or fails fast. huggingface_hub
    # reads the variable at import time, so set its constant too.
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    # PEFT warns about things these tests do on purpose (Conv1D fan_in_fan_out, tied lm_head, lora_bias on a
    # bias-free layer, saving embedding layers); none of it is under test.
    for line in (
        "ignore::UserWarning:peft",
        "ignore::FutureWarning:peft",
        "ignore::UserWarning:transformers",
        "ignore::DeprecationWarning:transformers",
        "ignore::FutureWarning:transformers",
    ):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def base_models() -> dict[str, nn.Module]:
    return {arch: build_base(arch) for arch in ARCHS}


@pytest.fixture
def fresh_model(base_models: dict[str, nn.Module]) -> Callable[[str], nn.Module]:
    """fresh_model(arch): a private deep copy of that session base model."""

    def make(arch: str) -> nn.Module:
        return copy.deepcopy(base_models[arch])

    return make


def input_ids(rows: int, *, seed: int = 1234, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Padding-free prompts of equal length; row i differs from row j."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, seq_len), generator=gen)


# -- adapters written by PEFT -----------------------------------------------------------------------------


def rewrite_config(folder: Path, **updates: Any) -> None:
    """Change adapter_config.json fields; dict values keep the insertion order given here (PEFT reads JSON
    order, and rank/alpha patterns are first-match-wins)."""
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(updates)
    path.write_text(json.dumps(raw, indent=2))


def weights_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(folder)


def edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]) -> None:
    """Rewrite adapter_model.safetensors through ``edit`` (which may mutate the dict in place)."""
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    new = edit(state)
    save_file(new if new is not None else state, str(path), metadata={"format": "pt"})


def _lora_config(kwargs: Mapping[str, Any]) -> Any:
    from peft import LoraConfig

    options = {"init_lora_weights": False, **kwargs}
    return LoraConfig(**options)


@pytest.fixture
def make_adapter(tmp_path: Path, base_models: dict[str, nn.Module]) -> Callable[..., Path]:
    """make_adapter(arch, name, *, seed, ...LoraConfig kwargs) -> folder written by PEFT's save_pretrained.

    Options:
      base: build on this model instead of the session base of ``arch`` (e.g. a different-size model);
      save_dtype: cast every floating tensor of the saved file to this dtype (an adapter saved in fp16/bf16);
      safe_serialization: False writes adapter_model.bin;
      extra: {adapter name: LoraConfig kwargs} added to the same PeftModel, so save_pretrained writes them to
        <folder>/<adapter name>/ (load with subfolder=<adapter name>); seeds follow ``seed``;
      config_updates: fields rewritten in adapter_config.json after saving (see rewrite_config).
    """
    counter = iter(range(10**6))

    def make(
        arch: str,
        name: str | None = None,
        *,
        seed: int,
        base: nn.Module | None = None,
        save_dtype: torch.dtype | None = None,
        safe_serialization: bool = True,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
        config_updates: Mapping[str, Any] | None = None,
        **lora_kwargs: Any,
    ) -> Path:
        from peft import get_peft_model

        folder = tmp_path / "adapters" / (name or f"{arch}-{next(counter)}")
        model = copy.deepcopy(base if base is not None else base_models[arch])
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, _lora_config(lora_kwargs))
        for i, (extra_name, extra_kwargs) in enumerate((extra or {}).items()):
            torch.manual_seed(seed + 1 + i)
            peft_model.add_adapter(extra_name, _lora_config(extra_kwargs))
        # A modules_to_save copy starts equal to the base module; perturb it as training would, or a loader that
        # ignored it would still pass.
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if ".modules_to_save." in param_name:
                    param.add_(torch.randn_like(param) * 0.05)
        peft_model.save_pretrained(str(folder), safe_serialization=safe_serialization)
        if save_dtype is not None:
            assert safe_serialization
            edit_weights(
                folder,
                lambda sd: {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in sd.items()},
            )
        if config_updates:
            rewrite_config(folder, **config_updates)
        return folder

    return make


# -- the PEFT oracle --------------------------------------------------------------------------------------


def peft_model_for(base: nn.Module, adapters: Mapping[str, Path | tuple[Path, Mapping[str, Any]]]) -> Any:
    """A PeftModel over a deep copy of ``base`` with every adapter loaded under its name.

    adapters: {name: folder} or {name: (folder, extra load_adapter kwargs such as subfolder)}.
    """
    from peft import PeftModel

    model: Any = None
    for name, spec in adapters.items():
        folder, kwargs = (spec, {}) if isinstance(spec, Path) else (spec[0], dict(spec[1]))
        if model is None:
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder), adapter_name=name, **kwargs)
        else:
            model.load_adapter(str(folder), adapter_name=name, **kwargs)
    assert model is not None
    return model.eval()


def peft_row_logits(peft_model: Any, ids: torch.Tensor, rows: Sequence[str | None]) -> torch.Tensor:
    """Each row run ALONE through PEFT with its adapter active (None: adapters disabled)."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name is None:
                with peft_model.disable_adapter():
                    outs.append(peft_model(input_ids=ids[i : i + 1]).logits[0])
            else:
                peft_model.set_adapter(name)
                outs.append(peft_model(input_ids=ids[i : i + 1]).logits[0])
    return torch.stack(outs)


def routed_logits(model: nn.Module, manager: Any, ids: torch.Tensor, rows: Sequence[Any]) -> torch.Tensor:
    with torch.no_grad(), manager.routing(rows):
        return model(input_ids=ids).logits


def bare_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
