"""Admitting a generation request: tokenize, check every limit, resolve the adapter, before it is queued.

This runs on the caller's thread (``Engine.submit``): bad input fails at submission with a typed error naming
the field, never later inside the batch, and nothing is queued for a request that cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loramux.core.adapters.adapter import LoadedAdapter
from loramux.core.adapters.manager import AdapterManager
from loramux.core.engine.config import EngineConfig
from loramux.core.engine.requests import AdapterSelection, EventChannel, FinishReason, GenerationRequest
from loramux.core.engine.sampling import RowSampler
from loramux.core.engine.text_stream import TextStream
from loramux.core.errors import CapacityExceededError, InvalidArgumentError


@dataclass
class Row:
    """A request admitted to the engine, and its progress once it runs (engine thread only)."""

    request: GenerationRequest
    channel: EventChannel
    adapter: LoadedAdapter | None
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: RowSampler
    text: TextStream
    generated: int = 0
    last_token: int = -1
    finish: FinishReason | None = None


@dataclass(frozen=True)
class Admission:
    config: EngineConfig
    tokenizer: Any  # a transformers tokenizer
    manager: AdapterManager
    vocab_size: int

    def admit(self, request: GenerationRequest) -> Row:
        prompt_ids = self._tokenize(request)
        cfg = self.config
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty", field="input")
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise CapacityExceededError(
                f"prompt has {len(prompt_ids)} tokens, more than the limit {cfg.max_prompt_tokens}", field="input"
            )
        max_new = request.max_new_tokens if request.max_new_tokens is not None else cfg.default_max_new_tokens
        if not 1 <= max_new <= cfg.max_new_tokens_ceiling:
            raise InvalidArgumentError(
                f"max_new_tokens must be in [1, {cfg.max_new_tokens_ceiling}] (got {max_new})",
                field="stopping.max_new_tokens",
            )
        if len(prompt_ids) + max_new > cfg.max_total_tokens:
            raise CapacityExceededError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new}) exceeds {cfg.max_total_tokens} tokens",
                field="stopping.max_new_tokens",
            )
        adapter = self._resolve_adapter(request.adapter)
        return Row(
            request=request,
            channel=EventChannel(adapter=adapter.name if adapter is not None else None, prompt_tokens=len(prompt_ids)),
            adapter=adapter,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampler=RowSampler(request.sampling, prompt_ids=prompt_ids),
            text=TextStream(self.tokenizer, stops=request.stop),
        )

    def _resolve_adapter(self, choice: str | AdapterSelection) -> LoadedAdapter | None:
        if choice is AdapterSelection.BASE:
            return None
        if choice is AdapterSelection.DEFAULT:
            return self.manager.resolve_default()
        return self.manager.acquire(choice)

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, str):
            if request.apply_chat_template:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise InvalidArgumentError(
                        "this model's tokenizer has no chat template", field="apply_chat_template"
                    )
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
                )
                return list(ids["input_ids"] if isinstance(ids, dict) else ids)
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if request.apply_chat_template:
            raise InvalidArgumentError("apply_chat_template needs a text prompt", field="apply_chat_template")
        vocab = self.vocab_size
        ids = list(prompt)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidArgumentError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", field="token_ids"
            )
        return ids
