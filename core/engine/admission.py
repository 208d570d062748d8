"""Admitting a generation request: tokenize, check every limit, claim the adapter, before it is queued.

This runs on the caller's thread (``Engine.submit``): bad input fails at submission with a typed error naming
the field, never later inside the batch, and nothing is queued for a request that cannot run. The adapter is
claimed last (a lease on a resident adapter, or a place in the load of one that is not; see
loramux.core.adapters.claims), so a request refused here holds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loramux.core.adapters.adapter import LoadedAdapter
from loramux.core.adapters.claims import Claim
from loramux.core.adapters.manager import AdapterManager
from loramux.core.engine.config import EngineConfig
from loramux.core.engine.limits import EngineLimits
from loramux.core.engine.requests import AdapterSelection, EventChannel, FinishReason, GenerationRequest
from loramux.core.engine.sampling import RowSampler
from loramux.core.engine.text_stream import TextStream
from loramux.core.errors import CapacityExceededError, InvalidArgumentError, LoramuxError


@dataclass(eq=False)
class Row:
    """A request admitted to the engine, and its progress once it runs (engine thread only)."""

    request: GenerationRequest
    channel: EventChannel
    adapter_name: str | None  # what it runs with (None: the base model), resolved at admission
    claim: Claim  # on that adapter: given back (AdapterManager.release) when the row leaves, whatever happens
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: RowSampler
    text: TextStream
    adapter: LoadedAdapter | None = None  # once its claim is settled (before it joins the batch)
    error: LoramuxError | None = None  # why it could not start (its adapter failed to load)
    generated: int = 0
    last_token: int = -1
    finish: FinishReason | None = None

    @property
    def final_len(self) -> int:
        """Its length once finished at the latest: what the KV budget counts."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class Admission:
    config: EngineConfig
    limits: EngineLimits
    tokenizer: Any  # a transformers tokenizer
    manager: AdapterManager
    vocab_size: int

    def precheck(self, request: GenerationRequest) -> None:
        """The checks that need no tokenizing (cheap enough for an event loop): a text prompt too long to fit."""
        prompt, cap = request.prompt, self.limits.max_prompt_bytes
        if isinstance(prompt, str) and (len(prompt) > cap or len(prompt.encode("utf-8", "surrogatepass")) > cap):
            raise CapacityExceededError(
                f"the prompt text is longer than {cap} bytes, so it has more than {self.config.max_prompt_tokens}"
                " tokens (the limit); it was not tokenized",
                field="input",
            )
        if not isinstance(prompt, str) and len(prompt) > self.config.max_prompt_tokens:
            raise CapacityExceededError(
                f"prompt has {len(prompt)} tokens, more than the limit {self.config.max_prompt_tokens}", field="input"
            )

    def admit(self, request: GenerationRequest) -> Row:
        self.precheck(request)
        prompt_ids = self._tokenize(request)
        cfg, limits = self.config, self.limits
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
        total = len(prompt_ids) + max_new
        if total > limits.max_total_tokens:
            context = f" (the model's context length is {limits.model_len})" if limits.model_len is not None else ""
            raise CapacityExceededError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new}) exceeds {limits.max_total_tokens} tokens"
                + context,
                field="stopping.max_new_tokens",
            )
        if not limits.kv.fits([total]):
            raise CapacityExceededError(
                f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new}) needs more KV cache than the"
                f" {limits.kv.max_bytes} bytes allowed, even alone (at most {limits.kv.longest_alone()} tokens fit)",
                field="max_kv_memory",
            )
        sampler = RowSampler(request.sampling, prompt_ids=prompt_ids)
        text = TextStream(self.tokenizer, stops=request.stop)
        claim, name = self._claim(request.adapter)
        return Row(
            request=request,
            channel=EventChannel(adapter=name, prompt_tokens=len(prompt_ids)),
            adapter_name=name,
            claim=claim,
            adapter=claim.adapter,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampler=sampler,
            text=text,
        )

    def _claim(self, choice: str | AdapterSelection) -> tuple[Claim, str | None]:
        if choice is AdapterSelection.BASE:
            return Claim(), None
        claim = self.manager.claim_default() if choice is AdapterSelection.DEFAULT else self.manager.claim(choice)
        job = claim.job
        return claim, claim.adapter.name if claim.adapter is not None else job.name if job is not None else None

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
