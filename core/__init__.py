"""loramux's core: one base causal LM, many LoRA adapters routed per row, a continuous-batching engine.

No grpc here. The subpackages, in the one direction they import (``errors`` is imported by all):

- ``lora``: what LoRA tensors are and how a batch routes each row through its own adapter;
- ``adapters``: what an adapter is, where it comes from, how it loads, when it leaves (the manager);
- ``model``: the base model's pieces the engine runs (loader, KV cache, attention, linear kernels);
- ``engine``: requests, admission, scheduling, sampling, text, and the engine loop.

``engine -> adapters -> lora``, ``engine -> model``; nothing imports ``engine``. The names below are the
public API, imported on first use (``import loramux.core.errors`` does not load torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loramux.core.adapters.adapter import AdapterInfo, LoadResult
    from loramux.core.adapters.manager import AdapterManager
    from loramux.core.engine.config import EngineConfig
    from loramux.core.engine.engine import Engine
    from loramux.core.engine.load import EngineLoad
    from loramux.core.engine.requests import (
        AdapterSelection,
        ChatMessage,
        ChatPrompt,
        EventChannel,
        Finished,
        FinishReason,
        GenerationEvent,
        GenerationRequest,
        TokenDelta,
        TokenLogprob,
    )
    from loramux.core.engine.sampling import SamplingParams
    from loramux.core.model.linear_kernels import LinearKernel

_PUBLIC = {
    "AdapterInfo": "loramux.core.adapters.adapter",
    "LoadResult": "loramux.core.adapters.adapter",
    "AdapterManager": "loramux.core.adapters.manager",
    "EngineConfig": "loramux.core.engine.config",
    "Engine": "loramux.core.engine.engine",
    "EngineLoad": "loramux.core.engine.load",
    "AdapterSelection": "loramux.core.engine.requests",
    "EventChannel": "loramux.core.engine.requests",
    "Finished": "loramux.core.engine.requests",
    "FinishReason": "loramux.core.engine.requests",
    "GenerationEvent": "loramux.core.engine.requests",
    "GenerationRequest": "loramux.core.engine.requests",
    "TokenDelta": "loramux.core.engine.requests",
    "ChatMessage": "loramux.core.engine.requests",
    "ChatPrompt": "loramux.core.engine.requests",
    "TokenLogprob": "loramux.core.engine.requests",
    "SamplingParams": "loramux.core.engine.sampling",
    "LinearKernel": "loramux.core.model.linear_kernels",
}
__all__ = [
    "AdapterInfo",
    "AdapterManager",
    "AdapterSelection",
    "ChatMessage",
    "ChatPrompt",
    "Engine",
    "EngineConfig",
    "EngineLoad",
    "EventChannel",
    "FinishReason",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "LinearKernel",
    "LoadResult",
    "SamplingParams",
    "TokenDelta",
    "TokenLogprob",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'loramux.core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
