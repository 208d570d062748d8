"""What a Generate stream yields to a caller: text deltas, then one completion."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability, and the most likely (token id, log-probability) pairs at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class MixMember:
    name: str
    version: int
    weight: float


@dataclass(frozen=True)
class TextChunk:
    """Newly generated text and token ids (a delta); their log-probabilities when asked for."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    """The end of a successful generation."""

    finish_reason: str  # "eos", "stop_sequence", "stop_token" or "length"
    prompt_tokens: int
    completion_tokens: int
    adapter: str  # the adapter used; "" for the bare base model
    adapter_version: int
    stop_sequence: str
    seed: int | None
    request_id: str  # as echoed by the server in x-request-id
    stop_token_id: int | None = None  # for "stop_token"
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # with prompt_logprobs: one per prompt token after the first
    adapter_mix: tuple[MixMember, ...] = ()  # with adapter_mix: its members as used
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the server's prefix cache held (not prefilled)
    replica: str = ""  # the replica that served it (x-loramux-replica), e.g. behind a load balancer


GenerateEvent = TextChunk | Completion
