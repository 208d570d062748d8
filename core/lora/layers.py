"""Wrapping base modules so that a routing plan can add per-row adapter outputs.

A ``RoutedModule`` holds the original module as ``base_layer`` and has no adapter state of its own: with no
plan active (or no route for it) it is exactly the base module. Modules are wrapped once, the first time an
adapter targets them, and stay wrapped; wrapping never changes any output by itself.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from loramux.core.lora.routing import current_plan


class RoutedModule(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer  # registered: state_dict, .to(), named_modules see it
        object.__setattr__(self, "_base", base_layer)  # plain attribute: no Module.__getattr__ per call
        self.routed_name = name

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        plan = current_plan()
        route = plan.routes.get(self.routed_name) if plan is not None else None
        if route is None:
            return self._base(x, *args, **kwargs)
        if x.shape[0] != plan.rows:  # type: ignore[union-attr]
            raise ValueError(f"routing plan has {plan.rows} rows but {self.routed_name} got {x.shape[0]}")  # type: ignore[union-attr]
        return route.forward(self._base, x, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # transformers reads attributes such as `.weight` or `.embed_scale` from the modules it built; forward
        # public names to the base module, and fail with a clear message for everything else.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_layer":  # never recurse while half-built
                raise
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        return f"routed_name={self.routed_name!r}"


def wrap_modules(model: nn.Module, names: list[str], modules: Mapping[str, nn.Module]) -> None:
    """Replace each named module by a RoutedModule around it (idempotent)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model  # the original object, even if wrapped
        current = getattr(parent, leaf)
        if isinstance(current, RoutedModule):
            continue
        if current is not modules[name]:
            raise RuntimeError(f"module {name} changed since loramux indexed the model")
        setattr(parent, leaf, RoutedModule(current, name))


def unwrapped_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a base module with every RoutedModule inside replaced by its base layer: a
    modules_to_save copy is the adapter's own module, untouched by other adapters' routes."""
    replica = copy.deepcopy(module)
    if isinstance(replica, RoutedModule):
        replica = replica.base_layer
    for parent in list(replica.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, RoutedModule):
                setattr(parent, child_name, child.base_layer)
    return replica
