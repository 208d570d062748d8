"""Writing adapters in PEFT's on-disk format: a fresh one to train, and a trained (or any loaded) one to ship.

The files are exactly what ``PeftModel.save_pretrained`` writes for a LoRA adapter: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (and
``lora_embedding_A`` / ``lora_embedding_B`` for embeddings), so peft loads them, and so does loramux.

Training with loramux alone: ``write_initial_adapter`` (A random, B zero, as PEFT initialises), then
``AdapterManager.load_adapter(folder, name, is_trainable=True)``, an optimizer over
``manager.acquire(name).parameters()`` with forwards under ``manager.routing``, then ``export_adapter``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from loramux.core.adapters.adapter import LoadedAdapter
from loramux.core.adapters.loading import PREFIX
from loramux.core.adapters.sources import CONFIG_NAME
from loramux.core.adapters.spec import LoraSpec
from loramux.core.adapters.targeting import TargetKind, resolve_targets
from loramux.core.lora.layers import RoutedModule

WEIGHTS_NAME = "adapter_model.safetensors"


def lora_config(
    *,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str] | str,
    base_model_name_or_path: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A LoRA adapter_config.json as PEFT writes it (fields left out take PEFT's defaults when it loads)."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    config.update(extra)
    return config


def write_initial_adapter(
    model: nn.Module,
    folder: str | Path,
    *,
    config: Mapping[str, Any],
    seed: int,
) -> Path:
    """An untrained adapter for ``model``: every lora_A kaiming-uniform (a=sqrt(5)) and lora_B zero, as PEFT's
    default init, so it starts as a no-op. Embedding targets get PEFT's embedding init (A zero, B normal)."""
    spec = LoraSpec.from_dict(config)  # refuses a config loramux could not load back
    modules = _unwrapped_modules(model)
    output = getattr(model, "get_output_embeddings", lambda: None)()
    output_name = next((n for n, m in modules.items() if output is not None and m is output), None)
    targets = resolve_targets(spec, modules, output_embedding_name=output_name)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for target in targets:
        base = PREFIX + target.name
        if target.kind is TargetKind.EMBEDDING:
            state[f"{base}.lora_embedding_A"] = torch.zeros(target.r, target.in_features)
            state[f"{base}.lora_embedding_B"] = torch.randn(target.out_features, target.r, generator=generator)
        else:
            bound = 1.0 / math.sqrt(target.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
            a = torch.rand(target.r, target.in_features, generator=generator) * (2 * bound) - bound
            state[f"{base}.lora_A.weight"] = a
            state[f"{base}.lora_B.weight"] = torch.zeros(target.out_features, target.r)
            if spec.lora_bias:
                state[f"{base}.lora_B.bias"] = torch.zeros(target.out_features)
    return _write(Path(folder), dict(config), state)


def export_adapter(
    adapter: LoadedAdapter,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    config_updates: Mapping[str, Any] | None = None,
) -> Path:
    """Write a resident adapter (for instance one just trained) in PEFT's format.

    The config is the one the adapter was loaded with (it describes these tensors exactly), with
    ``config_updates`` applied and inference_mode set. dtype: cast floating tensors (None keeps theirs).
    """
    config = json.loads(adapter.files.config.read_text(encoding="utf-8"))
    config.update(config_updates or {})
    config["inference_mode"] = True
    state = {key: _detached(t, dtype) for key, t in adapter_state_dict(adapter)}
    return _write(Path(folder), config, state)


def adapter_state_dict(adapter: LoadedAdapter) -> Iterator[tuple[str, Tensor]]:
    """PEFT file key -> tensor, for every tensor of the adapter (live tensors: detach before saving)."""
    weights = adapter.weights
    for name, lin in weights.linear.items():
        yield f"{PREFIX}{name}.lora_A.weight", lin.A
        yield f"{PREFIX}{name}.lora_B.weight", lin.B
        if lin.bias is not None:
            yield f"{PREFIX}{name}.lora_B.bias", lin.bias
    for name, emb in weights.embedding.items():
        yield f"{PREFIX}{name}.lora_embedding_A", emb.A
        yield f"{PREFIX}{name}.lora_embedding_B", emb.B
    for name, module in weights.saved_modules.items():
        for param_name, param in module.named_parameters():
            yield f"{PREFIX}{name}.{param_name}", param


def _detached(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    out = tensor.detach().to("cpu")
    if dtype is not None and out.is_floating_point():
        out = out.to(dtype)
    return out.contiguous()


def _unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """named_modules() under the base model's own names, even if a manager already wrapped some modules."""
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedModule):
            continue
        modules[name.replace(".base_layer", "")] = module
    return modules


def _write(folder: Path, config: Mapping[str, Any], state: Mapping[str, Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(dict(state), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder
