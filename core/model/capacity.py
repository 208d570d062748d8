"""What the base model can hold: its context length, and the bytes one token position of KV cache costs.

``context_length`` reads the positions the model was built for from its config (learned position embeddings
hold exactly that many; rotary models were trained up to it): requests past it are refused, never run.
``kv_bytes_per_token`` measures one cached position (keys and values of every layer, in the cache's dtype) with
a one-token forward, so it is right for any attention layout (GQA, MQA, sliding windows' full layers, ...).
"""

from __future__ import annotations

from typing import Final

import torch
from torch import nn
from transformers import DynamicCache

POSITION_FIELDS: Final = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model: nn.Module) -> int | None:
    """The most token positions the model holds (its config's first field of POSITION_FIELDS), or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of keys and values one token position takes in the cache, across all layers (measured)."""
    device = next(model.parameters()).device
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), past_key_values=cache, use_cache=True)
    total = 0
    for layer in cache.layers:
        for states in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if states is not None:
                total += states.numel() * states.element_size()  # (1, heads, 1, head_dim)
    if total <= 0:
        raise RuntimeError(f"{type(model).__name__} left nothing in its KV cache after a one-token forward")
    return total
