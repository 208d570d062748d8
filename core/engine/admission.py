"""Admitting a generation request: tokenize, check every limit, claim the adapter, before it is queued.

This runs on the caller's thread (``Engine.submit``): bad input fails at submission with a typed error naming
the field, never later inside the batch, and nothing is queued for a request that cannot run. The adapter (or
each member of a mix) is claimed last (a lease on a resident adapter, or a place in the load of one that is
not; see loramux.core.adapters.claims), so a request refused here holds nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from loramux.core.adapters.claims import Claim
from loramux.core.adapters.manager import AdapterManager
from loramux.core.engine.config import EngineConfig
from loramux.core.engine.limits import EngineLimits
from loramux.core.engine.prompts import prompt_ids
from loramux.core.engine.requests import (
    MAX_TOP_LOGPROBS,
    AdapterSelection,
    ChatPrompt,
    EventChannel,
    GenerationRequest,
)
from loramux.core.engine.row import Row
from loramux.core.engine.sampling import RowSampler
from loramux.core.engine.text_stream import TextStream
from loramux.core.errors import CapacityExceededError, InvalidArgumentError

MAX_STOP_TOKEN_IDS: Final = 16
MAX_MIX_MEMBERS: Final = 8
MAX_MIX_WEIGHT: Final = 10.0


@dataclass(frozen=True)
class Admission:
    config: EngineConfig
    limits: EngineLimits
    tokenizer: Any  # a transformers tokenizer
    manager: AdapterManager
    vocab_size: int
    eos: frozenset[int] = frozenset()

    def precheck(self, request: GenerationRequest) -> None:
        """The checks that need no tokenizing (cheap enough for an event loop): a text prompt too long to fit."""
        prompt, cap = request.prompt, self.limits.max_prompt_bytes
        text = "".join(m.content for m in prompt.messages) if isinstance(prompt, ChatPrompt) else prompt
        if isinstance(text, str) and (len(text) > cap or len(text.encode("utf-8", "surrogatepass")) > cap):
            raise CapacityExceededError(
                f"the prompt text is longer than {cap} bytes, so it has more than {self.config.max_prompt_tokens}"
                " tokens (the limit); it was not tokenized",
                field="input",
            )
        if not isinstance(text, str) and len(text) > self.config.max_prompt_tokens:
            raise CapacityExceededError(
                f"prompt has {len(text)} tokens, more than the limit {self.config.max_prompt_tokens}", field="input"
            )

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, as Generate sees them (Tokenize's answer)."""
        self.precheck(request)
        return prompt_ids(
            self.tokenizer, request.prompt, apply_chat_template=request.apply_chat_template, vocab_size=self.vocab_size
        )

    def admit(self, request: GenerationRequest) -> Row:
        ids = self.tokenize(request)
        max_new = self._check_lengths(request, ids)
        self._check_options(request, max_new)
        suppressed = frozenset(self.eos | set(request.stop_token_ids)) if request.min_new_tokens else frozenset()
        sampler = RowSampler(
            request.sampling, prompt_ids=ids, min_new_tokens=request.min_new_tokens, suppressed=suppressed
        )
        text = TextStream(self.tokenizer, stops=request.stop)
        claims, key = self._claims(request)
        single = claims[0] if len(claims) == 1 and not request.adapter_mix else None
        return Row(
            request=request,
            channel=EventChannel(
                adapter=key if not request.adapter_mix else None, prompt_tokens=len(ids), mix=bool(request.adapter_mix)
            ),
            key=key,
            claims=claims,
            prompt_ids=ids,
            max_new_tokens=max_new,
            sampler=sampler,
            text=text,
            adapter=single.adapter if single is not None else None,
            weights=single.adapter.weights if single is not None and single.adapter is not None else None,
        )

    def _check_lengths(self, request: GenerationRequest, ids: list[int]) -> int:
        cfg, limits = self.config, self.limits
        if not ids:
            raise InvalidArgumentError("the prompt is empty", field="input")
        if len(ids) > cfg.max_prompt_tokens:
            raise CapacityExceededError(
                f"prompt has {len(ids)} tokens, more than the limit {cfg.max_prompt_tokens}", field="input"
            )
        max_new = request.max_new_tokens if request.max_new_tokens is not None else cfg.default_max_new_tokens
        if not 1 <= max_new <= cfg.max_new_tokens_ceiling:
            raise InvalidArgumentError(
                f"max_new_tokens must be in [1, {cfg.max_new_tokens_ceiling}] (got {max_new})",
                field="stopping.max_new_tokens",
            )
        total = len(ids) + max_new
        if total > limits.max_total_tokens:
            context = f" (the model's context length is {limits.model_len})" if limits.model_len is not None else ""
            raise CapacityExceededError(
                f"prompt ({len(ids)}) + max_new_tokens ({max_new}) exceeds {limits.max_total_tokens} tokens" + context,
                field="stopping.max_new_tokens",
            )
        if not limits.kv.fits([total]):
            raise CapacityExceededError(
                f"prompt ({len(ids)}) + max_new_tokens ({max_new}) needs more KV cache than the"
                f" {limits.kv.max_bytes} bytes allowed, even alone (at most {limits.kv.longest_alone()} tokens fit)",
                field="max_kv_memory",
            )
        return max_new

    def _check_options(self, request: GenerationRequest, max_new: int) -> None:
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgumentError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {request.top_logprobs})", field="top_logprobs"
            )
        if not 0 <= request.min_new_tokens <= max_new:
            raise InvalidArgumentError(
                f"min_new_tokens must be in [0, max_new_tokens={max_new}] (got {request.min_new_tokens})",
                field="stopping.min_new_tokens",
            )
        stops = request.stop_token_ids
        if len(stops) > MAX_STOP_TOKEN_IDS or any(not 0 <= t < self.vocab_size for t in stops):
            raise InvalidArgumentError(
                f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} ids below the vocabulary size {self.vocab_size}",
                field="stopping.stop_token_ids",
            )
        if request.adapter_mix:
            _check_mix(request)

    def _claims(self, request: GenerationRequest) -> tuple[list[Claim], str | None]:
        """The claims the row holds, and its queue key. All or nothing: a refused member releases the others."""
        if request.adapter_mix:
            claims: list[Claim] = []
            try:
                for name, _ in request.adapter_mix:
                    claims.append(self.manager.claim(name))
            except BaseException:
                for claim in claims:
                    self.manager.release(claim)
                raise
            return claims, "+".join(name for name, _ in request.adapter_mix)
        choice = request.adapter
        if choice is AdapterSelection.BASE:
            return [], None
        claim = self.manager.claim_default() if choice is AdapterSelection.DEFAULT else self.manager.claim(choice)
        job = claim.job
        resolved = claim.adapter.name if claim.adapter is not None else job.name if job is not None else None
        return ([claim] if resolved is not None else []), resolved


def _check_mix(request: GenerationRequest) -> None:
    mix = request.adapter_mix
    problem = None
    if request.adapter is not AdapterSelection.DEFAULT:
        problem = "adapter_mix replaces adapter: set one of them"
    elif not 2 <= len(mix) <= MAX_MIX_MEMBERS:
        problem = f"adapter_mix needs 2 to {MAX_MIX_MEMBERS} adapters (got {len(mix)})"
    elif len({name for name, _ in mix}) != len(mix):
        problem = "adapter_mix names an adapter more than once"
    elif not all(_is_weight(w) for _, w in mix):
        problem = f"adapter_mix weights must be finite, non-zero and in [-{MAX_MIX_WEIGHT}, {MAX_MIX_WEIGHT}]"
    if problem is not None:
        raise InvalidArgumentError(problem, field="adapter_mix")


def _is_weight(w: object) -> bool:
    return isinstance(w, int | float) and math.isfinite(w) and w != 0 and abs(w) <= MAX_MIX_WEIGHT
