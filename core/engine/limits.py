"""The limits the engine enforces, resolved once against its model when it starts (EngineConfig + the model).

* ``model_len``: the model's context length (loramux.core.model.capacity), lowered by ``max_model_len``;
  ``max_total_tokens`` (prompt + new tokens per request) is at most that, and defaults to it.
* ``kv``: the KV cache's budget (kv_budget.py), ``max_kv_bytes`` or a fraction of the memory available.
* ``prefix_cache_bytes``: the prefix cache's budget (prefix_cache.py), ``prefix_cache_bytes`` or the default.
* ``max_prompt_bytes``: a text prompt longer than this many bytes has more than ``max_prompt_tokens`` tokens
  whatever it says, so it is refused before it is tokenized. No token of the vocabulary stands for more input
  than its own UTF-8 spelling (byte-level BPE and SentencePiece spell tokens at least as long as the bytes
  they cover), and a factor of 4 covers normalizers that shrink the input (NFKD accents stripped, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn

from loramux.core.engine.config import (
    KV_MEMORY_FRACTION,
    PREFIX_CACHE_DEFAULT_BYTES,
    PREFIX_CACHE_MEMORY_FRACTION,
    EngineConfig,
)
from loramux.core.engine.kv_budget import KvBudget
from loramux.core.model.capacity import context_length, kv_bytes_per_token
from loramux.core.model.linear_kernels import available_memory_bytes

FALLBACK_TOTAL_TOKENS: Final = 4096  # when the model's config states no context length
_SHRINK_MARGIN: Final = 4


@dataclass(frozen=True)
class EngineLimits:
    model_len: int | None  # None: the model's config states none
    max_total_tokens: int
    kv: KvBudget
    max_prompt_bytes: int
    prefix_cache_bytes: int = 0  # 0: no prefix cache


def resolve_limits(config: EngineConfig, model: nn.Module, tokenizer: Any) -> EngineLimits:
    """Raises ValueError for a max_model_len past the model's own context length. Runs a one-token forward
    (the KV probe): call it on the thread that runs the model."""
    own = context_length(model)
    if config.max_model_len is not None and own is not None and config.max_model_len > own:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context length {own}")
    model_len = config.max_model_len or own
    cap = model_len if model_len is not None else FALLBACK_TOTAL_TOKENS
    total = min(config.max_total_tokens or cap, cap)
    per_token = kv_bytes_per_token(model)
    max_kv = config.max_kv_bytes or _default_kv_bytes(model, fallback=config.max_batch_rows * total * per_token * 2)
    return EngineLimits(
        model_len=model_len,
        max_total_tokens=total,
        kv=KvBudget(bytes_per_token=per_token, max_bytes=max_kv),
        max_prompt_bytes=config.max_prompt_tokens * max_token_bytes(tokenizer) * _SHRINK_MARGIN,
        prefix_cache_bytes=_prefix_cache_bytes(config, model),
    )


def _prefix_cache_bytes(config: EngineConfig, model: nn.Module) -> int:
    if config.prefix_cache_bytes is not None:
        return config.prefix_cache_bytes
    available = _available(next(model.parameters()).device)
    share = int(available * PREFIX_CACHE_MEMORY_FRACTION) if available else PREFIX_CACHE_DEFAULT_BYTES
    return min(PREFIX_CACHE_DEFAULT_BYTES, share)


def _available(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory_bytes()


def max_token_bytes(tokenizer: Any) -> int:
    """The longest UTF-8 spelling of any token of the vocabulary (added tokens included)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=16)


def _default_kv_bytes(model: nn.Module, *, fallback: int) -> int:
    available = _available(next(model.parameters()).device)
    return int(available * KV_MEMORY_FRACTION) if available else fallback
