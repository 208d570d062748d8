"""The segmented LoRA route, for prefill: each adapter's rows times its own A and B, with no stacks at all.

A prefill runs once per group of joining rows, many tokens per row, so a loop over the group's adapters costs
a few matmuls each, big enough to pay for their calls. The gathered route's per-row stacks would copy one
adapter's worth of weights per row into fresh memory for that one forward (at 32 joining rows of r=16
adapters on the bench's model, 152 MiB, given back right after): a server's peak memory rose by that much
over its adapters and KV cache, and the freed pages stayed resident as heap holes (`make bench-scale`).

Rows are taken in runs of consecutive rows on one adapter: a run is a slice of x and of the output, no
gather and no scatter. Rows keep the group's order (the decode batch inherits it, and ragged attention's runs
of similar lengths follow it); the engine's scheduler puts each adapter's rows of a group next to each other
within rows of similar width (scheduler.together), so an adapter usually takes one run; rows of one adapter
that are apart take one run each (gathering them per adapter measured no faster). Each row's delta is PEFT's
(x @ A.T @ B.T) * scaling; base rows get nothing added.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loramux.core.lora.route import Route
from loramux.core.lora.weights import LinearLora


def runs(row_loras: Sequence[LinearLora | None]) -> list[tuple[LinearLora, int, int]]:
    """(lora, start, stop) for each maximal run of consecutive rows on the same LoRA; base rows are skipped."""
    found: list[tuple[LinearLora, int, int]] = []
    for row, lora in enumerate(row_loras):
        if lora is None:
            continue
        if found and found[-1][0] is lora and found[-1][2] == row:
            found[-1] = (lora, found[-1][1], row + 1)
        else:
            found.append((lora, row, row + 1))
    return found


class SegmentedLinear(Route):
    def __init__(self, row_loras: Sequence[LinearLora | None]) -> None:
        self.runs = runs(row_loras)

    def compact(self, moves: Sequence[tuple[int, int]], rows: int) -> None:
        raise RuntimeError("a segmented (prefill) route is not kept across steps")

    def forward(self, base_layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        out = base_layer(x, *args, **kwargs)  # (N, T, out)
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1])  # (N, T, in)
        fresh = out.is_contiguous() and not out.requires_grad  # the base output is ours to add into
        result = (out if fresh else out.clone(memory_format=torch.contiguous_format)).view(n, -1, out.shape[-1])
        for lora, start, stop in self.runs:
            h = x3[start:stop].reshape(-1, x3.shape[-1]).to(lora.At.dtype) @ lora.At  # (n*T, r)
            seg = result[start:stop].view(-1, result.shape[-1])  # (n*T, out), a view
            if lora.bias is None and seg.dtype == h.dtype:
                seg.addmm_(h, lora.Bt, alpha=lora.scaling)  # out + (h @ Bt) * scaling, fused
                continue
            delta = (h @ lora.Bt if lora.bias is None else torch.addmm(lora.bias, h, lora.Bt)) * lora.scaling
            seg.copy_(seg + delta)  # PEFT: added in the LoRA dtype (promoted), cast once to the base dtype
        return result.view(out.shape)
