"""Admitting a generation request: tokenize, check every limit, resolve the adapter, before it is queued.

This runs on the caller's thread (``Engine.submit``): bad input fails at submission with a typed error naming
the field, never later inside the batch, and nothing is queued for a request that cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from core.adapter import LoadedAdapter
from core.adapter_manager import AdapterManager
from core.errors import CapacityExceededError, InvalidArgumentError
from core.linear_kernels import LINEAR_KERNELS, ONEDNN
from core.requests import AdapterSelection, EventChannel, FinishReason, GenerationRequest
from core.sampling import RowSampler
from core.text_stream import TextStream


@dataclass(frozen=True)
class EngineConfig:
    max_batch_rows: int = 32
    max_queued: int = 256
    max_prompt_tokens: int = 2048
    max_total_tokens: int = 4096  # prompt + new tokens, per request
    default_max_new_tokens: int = 256
    max_new_tokens_ceiling: int = 2048
    # Padded prompt tokens prefilled in one step (rows x longest prompt); the rest join at the next steps, so
    # running rows keep decoding between chunks of a burst. A longer single prompt is still admitted alone.
    max_prefill_tokens: int = 4096
    # A prompt longer than this is prefilled this many tokens per step, between the batch's decode steps
    # (core/chunked_prefill.py), so running streams do not stall behind it.
    prefill_chunk_tokens: int = 512
    # GEMM for the model's nn.Linear layers on CPU: "onednn" (faster at serving shapes) or "torch" (MKL's sgemm,
    # what transformers and PEFT use). See core/linear_kernels.py.
    linear_kernel: str = ONEDNN
    # Decode steps attend, per run of similar-length rows, only to their own columns of the left-padded cache
    # (core/ragged_attention.py); False keeps one SDPA call over the whole padded width.
    ragged_attention: bool = True

    def __post_init__(self) -> None:
        limits = [f.name for f in fields(self) if f.type == "int"]  # every int field is a limit or a size
        small = [f"{name}={getattr(self, name)}" for name in limits if getattr(self, name) < 1]
        if small:
            raise ValueError(f"engine limits must be >= 1: {', '.join(small)}")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)} (got {self.linear_kernel!r})")


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
