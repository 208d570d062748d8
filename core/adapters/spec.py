"""PEFT's adapter_config.json narrowed to what loramux computes with, validated up front.

``LoraSpec.from_dict`` either returns a spec whose every field is meaningful for inference, or raises one
``UnsupportedAdapterError`` that lists *every* offending field (so a caller fixes them in one go). Nothing
about the base model is checked here: that is ``targeting``'s and ``loading``' job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramux.core.errors import CorruptAdapterError, UnsupportedAdapterError

# init_lora_weights values whose initialisation rewrites the *base* weights during load (PEFT runs the init
# before overwriting the LoRA weights), so the saved adapter is only correct on a mutated base model.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Inits that only decide the value of LoRA weights absent from the file; the forward stays vanilla.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")

# Fields that select a different forward, restructure the base, or carry base weights; refused unless unset.
_VARIANT_FIELDS = (
    "use_dora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_bdlora",
    "use_qalora",
    "megatron_config",
    "ensure_weight_tying",
)

# Fields that matter only to training, initialisation or bookkeeping.
_IGNORED_FIELDS = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "fan_in_fan_out",  # only changes how PEFT *merges*; forced per layer type anyway
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "runtime_config",
)

_HANDLED_FIELDS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "lora_bias",
    "bias",
    "init_lora_weights",
)

_ACCEPTED_TASK_TYPES = (None, "CAUSAL_LM")


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass(frozen=True)
class LoraSpec:
    """The inference-relevant part of a PEFT LoRA config.

    target_modules: a regex string (fullmatch), the literal ``"all-linear"`` (any case), or a tuple of names
    (exact full names or dotted suffixes). rank_pattern/alpha_pattern keep JSON order: first match wins.
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    modules_to_save: tuple[str, ...]
    lora_bias: bool
    init_lora_weights: bool | str
    base_model_name_or_path: str | None = None

    @property
    def targets_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear"

    @property
    def missing_weights_are_noop(self) -> bool:
        """PEFT initialises absent LoRA weights with B=0 only when init_lora_weights is True."""
        return self.init_lora_weights is True

    @classmethod
    def from_file(cls, path: Path) -> LoraSpec:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptAdapterError(f"adapter_config.json is unreadable ({path.name}): {exc}") from exc
        if not isinstance(raw, dict):
            raise CorruptAdapterError("adapter_config.json must hold a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LoraSpec:
        problems = _unsupported_fields(raw) + _malformed_fields(raw)
        if problems:
            raise UnsupportedAdapterError("adapter_config.json is not supported", problems=problems)
        return cls(
            r=int(raw.get("r", 8)),
            lora_alpha=float(raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=tuple((k, int(v)) for k, v in (raw.get("rank_pattern") or {}).items()),
            alpha_pattern=tuple((k, float(v)) for k, v in (raw.get("alpha_pattern") or {}).items()),
            target_modules=_names_or_regex(raw["target_modules"]),
            exclude_modules=None if _is_unset(raw.get("exclude_modules")) else _names_or_regex(raw["exclude_modules"]),
            layers_to_transform=_layers(raw.get("layers_to_transform")),
            layers_pattern=_str_tuple(raw.get("layers_pattern")),
            modules_to_save=_str_tuple(raw.get("modules_to_save")) or (),
            lora_bias=bool(raw.get("lora_bias", False)),
            init_lora_weights=raw.get("init_lora_weights", True),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """PEFT's get_pattern_key: each of r and alpha resolves independently, first JSON-order match wins."""
        r = _first_pattern_match(self.rank_pattern, module_name, default=self.r)
        alpha = _first_pattern_match(self.alpha_pattern, module_name, default=self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _first_pattern_match(patterns: tuple[tuple[str, Any], ...], name: str, *, default: Any) -> Any:
    for key, value in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _unsupported_fields(raw: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type must be 'LORA' (got {peft_type!r})")
    if raw.get("task_type") not in _ACCEPTED_TASK_TYPES:
        problems.append(f"task_type {raw.get('task_type')!r} is not a causal LM adapter")
    if raw.get("bias", "none") != "none":
        problems.append(f"bias={raw.get('bias')!r} rewrites the shared base biases; only 'none' is supported")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        problems.append(f"init_lora_weights={init!r} mutates the base model during load; convert the adapter first")
    elif init not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} is not a known LoRA initialisation")
    for name in _VARIANT_FIELDS:
        if not _is_unset(raw.get(name)):
            problems.append(f"{name}={raw[name]!r} is a LoRA variant loramux does not implement")
    known = set(_VARIANT_FIELDS) | set(_IGNORED_FIELDS) | set(_HANDLED_FIELDS)
    for name in sorted(set(raw) - known):
        if not _is_unset(raw[name]):
            problems.append(f"unknown field {name}={raw[name]!r} (from a newer PEFT?) is set")
    return problems


def _malformed_fields(raw: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    r = raw.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"r must be a positive integer (got {r!r})")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        problems.append(f"lora_alpha must be a number (got {alpha!r})")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(name) or {}
        if not isinstance(pattern, dict):
            problems.append(f"{name} must be an object")
            continue
        for key, value in pattern.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or (name == "rank_pattern" and (not isinstance(value, int) or value <= 0)):
                problems.append(f"{name}[{key!r}]={value!r} is not valid")
    targets = raw.get("target_modules")
    if targets is None:
        problems.append("target_modules is null; loramux needs the saved list of targets")
    elif not _is_names_or_regex(targets):
        problems.append(f"target_modules must be a string or a list of strings (got {targets!r})")
    if not _is_unset(raw.get("exclude_modules")) and not _is_names_or_regex(raw["exclude_modules"]):
        problems.append("exclude_modules must be a string or a list of strings")
    layers = raw.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) or _is_int_list(layers)):
        problems.append(f"layers_to_transform must be an int or a list of ints (got {layers!r})")
    if layers is not None and isinstance(targets, str):
        problems.append("layers_to_transform cannot be combined with a regex target_modules")
    if not _is_unset(raw.get("layers_pattern")) and layers is None:
        problems.append("layers_pattern requires layers_to_transform")
    return problems


def _is_names_or_regex(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _names_or_regex(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


def _str_tuple(value: Any) -> tuple[str, ...] | None:
    if _is_unset(value):
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _layers(value: Any) -> int | tuple[int, ...] | None:
    if value is None or isinstance(value, int):
        return value
    return tuple(value)
