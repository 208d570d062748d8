"""A weighted mix of adapters as one row's LoRA: computed exactly, on the fly, never stored as an adapter.

For each module, delta = sum_i w_i * s_i * B_i @ A_i @ x, which is one LoRA of rank sum_i r_i: the members' A
stacked along the rank with each block scaled by w_i * s_i, their B side by side, scaling 1. That is exactly
what PEFT's ``add_weighted_adapter(adapters, weights, combination_type="cat")`` builds (it folds w_i * s_i
into A too), so a mixed row matches generating with that merged adapter. A module only some members target
gets only theirs. The tensors are built for the request (a copy of the members' weights) and dropped with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.core.errors import UnsupportedAdapterError
from loramux.core.lora.weights import AdapterWeights, LinearLora


def mix_weights(members: Sequence[tuple[str, AdapterWeights, float]]) -> AdapterWeights:
    """The mix of (name, weights, weight) members; UnsupportedAdapterError for what a mix cannot hold
    (embedding LoRA, modules_to_save, lora_bias), naming the members."""
    problems = [
        f"{name}: {what} cannot be mixed"
        for name, weights, _ in members
        for what, present in (
            ("embedding LoRA", weights.embedding),
            ("modules_to_save", weights.saved_modules),
            ("lora_bias", any(lo.bias is not None for lo in weights.linear.values())),
        )
        if present
    ]
    if problems:
        raise UnsupportedAdapterError("adapter_mix holds adapters a mix does not support", problems=problems)
    mixed = AdapterWeights()
    for module in dict.fromkeys(m for _, weights, _ in members for m in weights.linear):
        parts = [(weights.linear[module], w) for _, weights, w in members if module in weights.linear]
        dtype = parts[0][0].At.dtype
        for lora, _ in parts[1:]:
            dtype = torch.promote_types(dtype, lora.At.dtype)
        at = torch.cat([(lora.At * (w * lora.scaling)).to(dtype) for lora, w in parts], dim=1)  # (in, sum r)
        bt = torch.cat([lora.Bt.to(dtype) for lora, _ in parts], dim=0)  # (sum r, out)
        mixed.linear[module] = LinearLora(at.contiguous(), bt.contiguous(), None, 1.0)
    return mixed
