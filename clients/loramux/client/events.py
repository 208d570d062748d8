"""What a Generate stream yields to a caller: text deltas, then one completion."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextChunk:
    """Newly generated text and token ids (a delta)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    """The end of a successful generation."""

    finish_reason: str  # "eos", "stop_sequence" or "length"
    prompt_tokens: int
    completion_tokens: int
    adapter: str  # the adapter used; "" for the bare base model
    adapter_version: int
    stop_sequence: str
    seed: int | None
    request_id: str  # as echoed by the server in x-request-id


GenerateEvent = TextChunk | Completion
