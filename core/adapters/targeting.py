"""Which base modules an adapter touches, with PEFT's exact matching rules.

Names are the base model's own ``named_modules()`` names (``model.layers.0.self_attn.q_proj``), taken before
loramux wraps anything, so matching is stable however many adapters are loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from torch import nn
from transformers.pytorch_utils import Conv1D

from loramux.core.adapters.spec import LoraSpec
from loramux.core.errors import IncompatibleAdapterError


class TargetKind(Enum):
    LINEAR = "linear"  # nn.Linear and GPT-2's Conv1D: same LoRA forward, shapes read differently
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class Target:
    """One module an adapter applies LoRA to, with its resolved rank and scaling."""

    name: str
    kind: TargetKind
    r: int
    alpha: float
    scaling: float
    in_features: int  # for embeddings: num_embeddings
    out_features: int  # for embeddings: embedding_dim


def module_features(module: nn.Module) -> tuple[TargetKind, int, int] | None:
    """(kind, in, out) for a module type LoRA supports, else None. Conv1D stores its weight as (in, out)."""
    if isinstance(module, nn.Linear):
        return TargetKind.LINEAR, module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return TargetKind.LINEAR, module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return TargetKind.EMBEDDING, module.num_embeddings, module.embedding_dim
    return None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def resolve_targets(
    spec: LoraSpec, modules: Mapping[str, nn.Module], *, output_embedding_name: str | None
) -> list[Target]:
    """Every module the spec targets, in model order; raises if none match or one cannot carry LoRA."""
    target_modules = spec.target_modules
    if spec.targets_all_linear:
        target_modules = tuple(name for name, m in modules.items() if is_linear(m) and name != output_embedding_name)
    targets: list[Target] = []
    unsupported: list[str] = []
    excluded_any = False
    for name, module in modules.items():
        verdict = _matches(spec, target_modules, name)
        if verdict is None:
            excluded_any = True
            continue
        if not verdict:
            continue
        features = module_features(module)
        if features is None:
            unsupported.append(f"{name} is a {type(module).__name__}, not Linear, Conv1D or Embedding")
            continue
        kind, fan_in, fan_out = features
        r, alpha = spec.rank_and_alpha(name)
        if kind is TargetKind.EMBEDDING and spec.lora_bias:
            unsupported.append(f"{name}: lora_bias is not defined for embeddings")
        targets.append(Target(name, kind, r, alpha, spec.scaling(r, alpha), fan_in, fan_out))
    if unsupported:
        raise IncompatibleAdapterError("target modules cannot carry LoRA", problems=unsupported)
    if not targets:
        why = "all matching modules were excluded" if excluded_any else "none exist in the base model"
        raise IncompatibleAdapterError(
            f"target_modules {_describe(spec.target_modules)} match no module of the base model ({why})",
            problems=[],
        )
    return targets


def _matches(spec: LoraSpec, target_modules: str | tuple[str, ...], key: str) -> bool | None:
    """PEFT's check_target_module_exists. None means excluded (by exclude_modules or modules_to_save)."""
    excl = spec.exclude_modules
    if excl is not None:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return None
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return None
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in spec.modules_to_save):
        return None
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True  # an exact full name bypasses layers_to_transform, as in PEFT
    if not any(key.endswith(f".{t}") for t in target_modules):
        return False
    return _in_transformed_layers(spec, key)


def _in_transformed_layers(spec: LoraSpec, key: str) -> bool:
    layers = spec.layers_to_transform
    if layers is None or layers == ():
        return True
    match: re.Match[str] | None = None
    if not spec.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in spec.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def resolve_modules_to_save(spec: LoraSpec, modules: Mapping[str, nn.Module]) -> list[str]:
    """Names PEFT wraps in ModulesToSaveWrapper: plain ``endswith`` (no dot boundary), outermost only."""
    found: list[str] = []
    for name in modules:
        if name and any(name.endswith(m) for m in spec.modules_to_save):
            if not any(name.startswith(f"{outer}.") for outer in found):
                found.append(name)
    return found


def _describe(target_modules: str | tuple[str, ...]) -> str:
    if isinstance(target_modules, str):
        return repr(target_modules)
    return "[" + ", ".join(sorted(target_modules)) + "]"
