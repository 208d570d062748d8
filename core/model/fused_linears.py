"""Sibling linear layers that read the same input run as one GEMM: q/k/v of attention, gate/up of a gated MLP.

A decode step's GEMMs are skinny (a few rows against a wide weight), and a few wide ones stream their weights
faster than many narrow ones: the bench model's q/k/v and gate/up of 8 layers, one core of an Intel Xeon (AMX),
11.7 -> 9.2 ms at 8 rows on oneDNN, 6.5 -> 5.1 ms at one row on MKL (BENCHMARKS.md).

``fuse_siblings`` finds each group (``SIBLINGS``: leaf names under one parent, the same input features, dtype,
device and bias presence), concatenates the members' weights (and biases) into one tensor and makes each
member's parameter a view of its rows: the memory is the same, and the members stay ordinary ``nn.Linear``
layers to everything that reads them (state_dict, adapters' targeting, their own forward). The group's
``layer`` is a ``OneDnnLinear`` over the whole weight; its kernel is chosen like any other layer's.

The model's own code still calls q_proj, k_proj and v_proj one after another on the same tensor: the first call
of a group on an input runs the fused GEMM and hands each member its slice (copied out: see ``slices``); the
siblings' calls on that same input take theirs. A call on another input, a second call of one
member, autograd, or a member whose weight is no longer the view (replaced by ``.to()``, ``load_state_dict``
with ``assign``, ...) runs the fused GEMM again or the member's own GEMM: results are the member's own, to fp32
rounding (the GEMM's blocking differs), never another member's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Final

import torch
from torch import Tensor, nn

from loramux.core.model.linear_kernels import FUSED, by_rows

SIBLINGS: Final = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedSiblings:
    """One GEMM for ``members`` (each a plain or OneDnnLinear reading the same input)."""

    def __init__(self, members: Sequence[nn.Linear], *, layer_class: type[nn.Linear]) -> None:
        self.members = list(members)
        self.sizes = [m.out_features for m in members]
        first = members[0]
        weight = torch.cat([m.weight.detach() for m in members])  # (sum out, in)
        bias = torch.cat([m.bias.detach() for m in members]) if first.bias is not None else None
        layer = layer_class.__new__(layer_class)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = first.in_features, weight.shape[0]
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.layer = layer
        for member, w in zip(members, weight.split(self.sizes), strict=True):
            member.weight = nn.Parameter(w, requires_grad=member.weight.requires_grad)
        if bias is not None:
            for member, b in zip(members, bias.split(self.sizes), strict=True):
                member.bias = nn.Parameter(b, requires_grad=member.bias.requires_grad)
        self._params = [m.weight for m in members]
        self._index = {id(m): i for i, m in enumerate(members)}
        self._local = threading.local()  # the last input and the slices not yet taken, per thread
        # (rows, fused faster) by rows, as OneDnnLinear.onednn_rows: where one GEMM beat the members' own
        # (kernel_choice); a call of r rows follows the first entry with rows >= r. None: fused at every count
        self.fused_rows: tuple[tuple[int, bool], ...] | None = None
        for member in members:
            member.__dict__[FUSED] = self

    def output_of(self, member: nn.Linear, x: Tensor) -> Tensor | None:
        """member(x) from the group's GEMM, or None when the member must run its own (see the module docstring)."""
        local, i = self._local, self._index[id(member)]
        pending: list[Tensor | None] | None = getattr(local, "pending", None)
        if pending is not None and local.input is x and local.version == x._version and pending[i] is not None:
            out, pending[i] = pending[i], None  # a sibling's call on this input computed it
            local.left -= 1
            if not local.left:  # every sibling took its slice: hold no tensors between calls
                local.input = local.pending = None
            return out
        if not self.usable_at(x.numel() // x.shape[-1]):
            return None
        pending = self.slices(self.layer(x))
        out, pending[i] = pending[i], None
        local.input, local.version, local.pending, local.left = x, x._version, pending, len(pending) - 1
        return out

    def slices(self, y: Tensor) -> list[Tensor | None]:
        """The members' outputs in y (..., sum out): (..., out_i) each, contiguous. Views would cost nothing
        here, but a LoRA route adds into its base output in place, and into a strided view that went slower
        (bench model, 8 rows on 8 adapters: 309 tok/s with views, 324 with copies, 319 unfused)."""
        return [t.contiguous() for t in y.split(self.sizes, dim=-1)]

    def usable_at(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows runs as the group's GEMM now (measured faster, no autograd, the
        members' weights still its views)."""
        return self.fused_at(rows) and not torch.is_grad_enabled() and self._intact()

    def fused_at(self, rows: int) -> bool:
        """Whether calls of ``rows`` rows run as the group's GEMM (``fused_rows``: measured; default yes)."""
        table = self.fused_rows
        return True if table is None else by_rows(table, rows)

    def _intact(self) -> bool:
        # each member's weight still the view made here (not replaced by .to(), assign=True loading, ...)
        return all(m._parameters["weight"] is p for m, p in zip(self.members, self._params, strict=True))


def fuse_siblings(model: nn.Module, *, layer_class: type[nn.Linear]) -> list[FusedSiblings]:
    """Fuse each sibling group of ``model`` whose members are exactly ``layer_class``, on the CPU, and agree in
    input features, dtype and bias presence (a member wrapped by an adapter is found inside its wrapper).
    ``linear_kernels.use_linear_kernel`` undoes it (each member runs its own GEMM again)."""
    groups = []
    for parent in list(model.modules()):
        for names in SIBLINGS:
            members = [_base(getattr(parent, name, None)) for name in names]
            if _fusable(members, layer_class):
                groups.append(FusedSiblings(members, layer_class=layer_class))  # type: ignore[arg-type]
    return groups


def fused_groups(model: nn.Module) -> list[FusedSiblings]:
    """The model's sibling groups (each once)."""
    found: dict[int, FusedSiblings] = {}
    for module in model.modules():
        group = module.__dict__.get(FUSED)
        if group is not None:
            found.setdefault(id(group), group)
    return list(found.values())


def fused_layers(model: nn.Module) -> list[nn.Linear]:
    """The fused GEMM layers of the model's groups (each once)."""
    return [group.layer for group in fused_groups(model)]


def _base(module: object) -> object:
    return getattr(module, "base_layer", module) if isinstance(module, nn.Module) else None


def _fusable(members: Sequence[object], layer_class: type[nn.Linear]) -> bool:
    if not all(type(m) is layer_class for m in members):
        return False
    linears: list[nn.Linear] = list(members)  # type: ignore[arg-type]
    first = linears[0]
    same = all(
        m.in_features == first.in_features
        and m.weight.dtype == first.weight.dtype
        and m.weight.device.type == "cpu"
        and (m.bias is None) == (first.bias is None)
        for m in linears
    )
    return same and len({id(m) for m in linears}) == len(linears)
