"""How an adapter's files become its tensors: PEFT's keys mapped onto the resolved targets, every shape, dtype and
value checked, and only then tensors built; any problem is collected and raised once, so a failed load leaves
nothing behind.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from loramux.core.adapters.spec import LoraSpec
from loramux.core.adapters.targeting import Target, TargetKind
from loramux.core.errors import CorruptAdapterError, IncompatibleAdapterError
from loramux.core.lora.weights import AdapterWeights, EmbeddingLora, LinearLora
from loramux.core.memory import mapped_empty
from loramux.core.serial import all_finite_serial, copy_serial

PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoadOptions:
    read_device: torch.device | None  # where the file is read to (PEFT's torch_device); None: the base's
    autocast_adapter_dtype: bool  # fp16/bf16 LoRA weights computed in fp32, as PEFT does
    trainable: bool
    max_rank: int
    work_device: torch.device | None = None  # ephemeral GPU for the dtype casts; None: where it was read


@dataclass(frozen=True)
class LoadedWeights:
    weights: AdapterWeights
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


def read_state_dict(path: Path, device: torch.device | str) -> dict[str, Tensor]:
    """adapter_model.safetensors, or adapter_model.bin read with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            # the bytes read at once, then parsed: about twice as fast as load_file's mapped reads (bench.scale)
            state = {k: v.to(device) for k, v in load(path.read_bytes()).items()}
        else:
            state = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:  # safetensors and pickle raise many unrelated types for a bad file
        raise CorruptAdapterError(f"{path.name} is unreadable or truncated: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CorruptAdapterError(f"{path.name} does not hold a flat mapping of tensors")
    return state


def adapter_keys(target: Target, adapter_name: str) -> dict[str, str]:
    """File key -> PEFT's in-model key (the form PEFT reports missing keys in) for one target."""
    base = PREFIX + target.name
    if target.kind is TargetKind.EMBEDDING:
        return {f"{base}.lora_embedding_{m}": f"{base}.lora_embedding_{m}.{adapter_name}" for m in "AB"}
    return {f"{base}.lora_{m}.weight": f"{base}.lora_{m}.{adapter_name}.weight" for m in "AB"}


def read_adapter_weights(
    *,
    spec: LoraSpec,
    targets: list[Target],
    saved_module_names: list[str],
    state: Mapping[str, Tensor],
    modules: Mapping[str, nn.Module],
    base_params: Mapping[str, Tensor],
    adapter_name: str,
    options: LoadOptions,
    copy_module: Callable[[nn.Module], nn.Module] = copy.deepcopy,
) -> LoadedWeights:
    """copy_module makes modules_to_save copies; the manager passes one that drops routing wrappers."""
    problems: list[str] = []
    used: set[str] = set()
    missing: list[str] = []
    weights = AdapterWeights()
    arena = _Arena(options)
    pending: list[tuple[Target, int]] = []
    for target in targets:
        keys = adapter_keys(target, adapter_name)
        if spec.lora_bias and target.kind is TargetKind.LINEAR:
            keys[f"{PREFIX}{target.name}.lora_B.bias"] = f"{PREFIX}{target.name}.lora_B.{adapter_name}.bias"
        present = {k: state[k] for k in keys if k in state}
        used.update(present)
        missing.extend(keys[k] for k in keys if k not in state)
        by_role = _complete_from_init(target, spec, {_role(k): t for k, t in present.items()}, problems)
        if by_role is None:
            continue
        tensors = _checked(target, by_role, problems, options.max_rank)
        if tensors is not None:
            pending.append(_request_target(target, tensors, modules[target.name], arena))
    for name in saved_module_names:
        replica = copy_module(modules[name])
        _add_saved_module(weights, name, state, replica, used, problems, options)
    unexpected = [k for k in state if k not in used and not _is_unchanged_base(k, state[k], base_params, problems)]
    if problems:
        raise IncompatibleAdapterError("adapter weights do not fit the base model", problems=problems)
    arena.materialize()
    for target, slot in pending:
        _add_target(weights, target, arena.placed(slot))
    if weights.saved_modules or not arena.finite():  # the arena holds LoRA tensors only
        _check_finite(weights)  # checks each tensor, naming the modules
    return LoadedWeights(weights, tuple(missing), tuple(unexpected))


def _complete_from_init(
    target: Target, spec: LoraSpec, by_role: dict[str, Tensor], problems: list[str]
) -> dict[str, Tensor] | None:
    """Fill tensors absent from the file the way PEFT's initialisation would, where that is deterministic.

    With init_lora_weights=True PEFT starts a Linear with A random and B, bias = 0, and an Embedding with
    A = 0 and B random. An absent zero tensor is filled with zeros; an absent random one (its partner in the
    file) is refused, since nobody can reproduce PEFT's output then. None: the module contributes nothing.
    """
    expected = {"A", "B"} | ({"bias"} if spec.lora_bias and target.kind is TargetKind.LINEAR else set())
    absent = expected - by_role.keys()
    if not absent:
        return by_role
    random_role, zero_role = ("A", "B") if target.kind is TargetKind.LINEAR else ("B", "A")
    if not spec.missing_weights_are_noop or (random_role in absent and zero_role not in absent):
        problems.append(
            f"{target.name}: LoRA weights missing from the file ({', '.join(sorted(absent))}), and "
            f"init_lora_weights={spec.init_lora_weights!r} would leave PEFT with random values there"
        )
        return None
    if zero_role in absent and "bias" not in by_role:
        return None  # delta = B @ A = 0, no bias: nothing to add
    shapes = {"A": (target.r, target.in_features), "B": (target.out_features, target.r)}
    return {**by_role, **{role: torch.zeros(shapes[role]) for role in absent & {"A", "B"}}}


def _checked(
    target: Target, by_role: Mapping[str, Tensor], problems: list[str], max_rank: int
) -> dict[str, Tensor] | None:
    """Shapes by role ('A', 'B', 'bias'); appends a problem and returns None when anything is off."""
    r = target.r
    if r > max_rank:
        problems.append(f"{target.name}: rank {r} exceeds the configured maximum {max_rank}")
        return None
    expected: dict[str, tuple[int, ...]] = {"A": (r, target.in_features), "B": (target.out_features, r)}
    if target.kind is TargetKind.LINEAR:
        expected["bias"] = (target.out_features,)
    ok = True
    for role, tensor in by_role.items():
        if not tensor.is_floating_point():
            problems.append(f"{target.name}.{role}: dtype {tensor.dtype} is not floating point")
            ok = False
        elif tuple(tensor.shape) != expected[role]:
            problems.append(
                f"{target.name}.{role}: shape {tuple(tensor.shape)} does not fit the base module "
                f"(expected {expected[role]}, r={r})"
            )
            ok = False
    return dict(by_role) if ok else None


def _role(key: str) -> str:
    if key.endswith(".bias"):
        return "bias"
    return "A" if key.endswith(("lora_A.weight", "lora_embedding_A")) else "B"


def lora_dtype(base_dtype: torch.dtype, autocast: bool) -> torch.dtype:
    """PEFT creates LoRA weights in the base layer's dtype, then upcasts half types to fp32 on autocast."""
    if autocast and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


class _Arena:
    """Where an adapter's tensors are placed: one buffer per device and dtype for the whole adapter, each tensor
    a view of it, copied once into its final layout. One allocation per adapter instead of one per tensor (a
    thousand adapters' churn does not fragment the heap), and one finiteness check over the whole buffer.

    ``request`` records what to place and returns a slot; ``materialize`` allocates and copies; ``placed`` then
    gives each slot's tensors."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self._requests: list[tuple[list[Tensor], torch.device, torch.dtype]] = []
        self._placed: list[list[Tensor]] = []
        self._buffers: list[Tensor] = []

    def request(self, tensors: list[Tensor], base: Tensor) -> int:
        self._requests.append((tensors, base.device, lora_dtype(base.dtype, self.options.autocast_adapter_dtype)))
        return len(self._requests) - 1

    def materialize(self) -> None:
        groups: dict[tuple[torch.device, torch.dtype], int] = {}
        for tensors, device, dtype in self._requests:
            groups[(device, dtype)] = groups.get((device, dtype), 0) + sum(t.numel() for t in tensors)
        # each in a mapping of its own: an evicted adapter's memory goes back to the system (core/memory.py)
        buffers = {key: mapped_empty((n,), dtype=key[1], device=key[0]) for key, n in groups.items()}
        self._buffers = list(buffers.values())
        offsets = dict.fromkeys(buffers, 0)
        for tensors, device, dtype in self._requests:
            placed = []
            for tensor in tensors:
                if self.options.work_device is not None:
                    tensor = tensor.to(self.options.work_device)
                at = offsets[(device, dtype)]
                view = buffers[(device, dtype)][at : at + tensor.numel()].view(tensor.shape)
                copy_serial(view, tensor)  # on the loader thread: no OpenMP team (core/serial.py)
                offsets[(device, dtype)] = at + tensor.numel()
                placed.append(nn.Parameter(view, requires_grad=True) if self.options.trainable else view)
            self._placed.append(placed)

    def placed(self, slot: int) -> list[Tensor]:
        return self._placed[slot]

    def finite(self) -> bool:
        return all(all_finite_serial(buffer) for buffer in self._buffers)


def _request_target(target: Target, tensors: Mapping[str, Tensor], module: nn.Module, arena: _Arena):
    base = module.weight
    assert isinstance(base, Tensor)
    if target.kind is TargetKind.EMBEDDING:
        return target, arena.request([tensors["A"], tensors["B"]], base)
    # placed transposed (LinearLora's layout): one copy, and trainable parameters are the stored tensors
    bias = tensors.get("bias")
    return target, arena.request([tensors["A"].T, tensors["B"].T, *([bias] if bias is not None else [])], base)


def _add_target(weights: AdapterWeights, target: Target, placed: list[Tensor]) -> None:
    if target.kind is TargetKind.EMBEDDING:
        weights.embedding[target.name] = EmbeddingLora(placed[0], placed[1], target.scaling)
        return
    At, Bt, *rest = placed
    weights.linear[target.name] = LinearLora(At, Bt, rest[0] if rest else None, target.scaling)


def _add_saved_module(
    weights: AdapterWeights,
    name: str,
    state: Mapping[str, Tensor],
    replica: nn.Module,
    used: set[str],
    problems: list[str],
    options: LoadOptions,
) -> None:
    """modules_to_save: a full per-adapter copy, initialised from the base module (as PEFT does)."""
    for param_name, param in replica.named_parameters():
        key = f"{PREFIX}{name}.{param_name}"
        if key not in state:
            continue
        used.add(key)
        value = state[key]
        if tuple(value.shape) != tuple(param.shape):
            problems.append(f"{name}.{param_name}: shape {tuple(value.shape)}, base has {tuple(param.shape)}")
            continue
        with torch.no_grad():
            copy_serial(param, value)
    replica.requires_grad_(options.trainable)
    weights.saved_modules[name] = replica


def _is_unchanged_base(key: str, value: Tensor, base_params: Mapping[str, Tensor], problems: list[str]) -> bool:
    """A file may carry base weights (PEFT's save_embedding_layers). Equal to ours: harmless; else refuse."""
    name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
    base = base_params.get(name)
    if base is None or not key.startswith(PREFIX):
        return False
    if base.shape == value.shape and torch.equal(base.detach().cpu(), value.to(base.dtype).cpu()):
        return True
    problems.append(f"{key} would overwrite the shared base weight {name}; loramux never mutates the base")
    return True


def _check_finite(weights: AdapterWeights) -> None:
    bad = [
        name
        for name, lin in weights.linear.items()
        if not all(all_finite_serial(t) for t in (lin.At, lin.Bt, lin.bias) if t is not None)
    ]
    bad += [n for n, e in weights.embedding.items() if not (all_finite_serial(e.A) and all_finite_serial(e.B))]
    saved = weights.saved_modules.items()
    bad += [n for n, m in saved if not all(all_finite_serial(p.detach()) for p in m.parameters())]
    if bad:
        raise CorruptAdapterError("adapter weights contain NaN or Inf", problems=[f"{n}" for n in bad])
