"""What an adapter's tensors are: LoRA weights keyed by base-module name, in the layout routing multiplies by.

Plain data, no file formats and no model knowledge: ``loramux.core.adapters.loading`` builds these from PEFT's
files, ``loramux.core.lora.routing`` stacks them per row (and ``grouped`` per adapter, both padding ranks with
``padded_rank``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LinearLora:
    """LoRA on a Linear/Conv1D: delta = (x @ At @ Bt + bias) * scaling, i.e. PEFT's (x @ A.T @ B.T + bias) * scaling.

    Stored transposed, in the layout the routes multiply by: stacking rows for a batch is then a plain copy
    (a transposing copy of B was most of a routing plan's build, 38 of 46 ms at 64 rows). ``A`` and ``B`` are
    PEFT's views of the same tensors; ``from_peft`` builds one from PEFT's layout."""

    At: Tensor  # (in, r), contiguous
    Bt: Tensor  # (r, out), contiguous
    bias: Tensor | None  # (out,) — lora_bias, scaled like the rest
    scaling: float

    @classmethod
    def from_peft(cls, A: Tensor, B: Tensor, bias: Tensor | None, scaling: float) -> LinearLora:
        """From PEFT's lora_A.weight (r, in) and lora_B.weight (out, r)."""
        return cls(A.T.contiguous(), B.T.contiguous(), bias, scaling)

    @property
    def A(self) -> Tensor:  # (r, in), a view
        return self.At.T

    @property
    def B(self) -> Tensor:  # (out, r), a view
        return self.Bt.T

    @property
    def rank(self) -> int:
        return self.At.shape[1]


@dataclass
class EmbeddingLora:
    """LoRA on an Embedding: delta = embedding(ids, A.T) @ B.T * scaling (* embed_scale)."""

    A: Tensor  # (r, num_embeddings)
    B: Tensor  # (embedding_dim, r)
    scaling: float


@dataclass
class AdapterWeights:
    linear: dict[str, LinearLora] = field(default_factory=dict)
    embedding: dict[str, EmbeddingLora] = field(default_factory=dict)
    saved_modules: dict[str, nn.Module] = field(default_factory=dict)  # modules_to_save copies

    def tensors(self) -> Iterator[Tensor]:
        for lin in self.linear.values():
            yield lin.At
            yield lin.Bt
            if lin.bias is not None:
                yield lin.bias
        for emb in self.embedding.values():
            yield emb.A
            yield emb.B
        for module in self.saved_modules.values():
            yield from module.parameters()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def module_names(self) -> list[str]:
        return [*self.linear, *self.embedding, *self.saved_modules]


def padded_rank(lora: LinearLora, r_max: int, dtype: torch.dtype) -> LinearLora:
    """Zero-pad the rank to r_max (zero rows of A / columns of B add exactly nothing)."""
    pad = r_max - lora.rank
    if pad == 0 and lora.At.dtype == dtype:
        return lora
    return LinearLora(
        F.pad(lora.At.to(dtype), (0, pad)), F.pad(lora.Bt.to(dtype), (0, 0, 0, pad)), lora.bias, lora.scaling
    )


def common_dtype(tensors: Iterator[Tensor] | Sequence[Tensor]) -> torch.dtype:
    dtype: torch.dtype | None = None
    for t in tensors:
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    assert dtype is not None
    return dtype
