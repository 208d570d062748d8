"""The generation engine: one thread owns the model and decodes every running request in one batch.

Each loop iteration (a *step*): drop cancelled rows, admit queued requests (prefill them together, sample
their first token, merge their KV cache into the batch), then one decode forward for all rows, whatever
adapter each uses (per-row routing plan, rebuilt only when the batch composition changes). Events go to each
request's channel as they are produced.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core import kv_batch
from core.adapter import LoadedAdapter
from core.adapter_manager import AdapterManager
from core.errors import (
    CapacityExceededError,
    EngineFailure,
    InvalidArgumentError,
    LoramuxError,
    RequestCancelledError,
    ShuttingDownError,
)
from core.kv_cache import GrowableCache
from core.linear_kernels import LINEAR_KERNELS, ONEDNN, use_linear_kernel
from core.lora_weights import AdapterWeights
from core.requests import (
    AdapterSelection,
    EventChannel,
    Finished,
    FinishReason,
    GenerationRequest,
    TokenDelta,
    deliver,
)
from core.routing import RoutingPlan, extend_plan, swap_remove, use_plan
from core.sampling import RowSampler, sample_next_tokens
from core.text_stream import TextStream

log = logging.getLogger(__name__)


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
    # GEMM for the model's nn.Linear layers on CPU: "onednn" (faster at serving shapes) or "torch" (MKL's sgemm,
    # what transformers and PEFT use). See core/linear_kernels.py.
    linear_kernel: str = ONEDNN


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds at one moment (for metrics and routers). Adapter names exclude the base model."""

    running: int  # rows in the decode batch
    waiting: int  # requests queued for a batch row
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]
    steps: int  # decode steps so far


@dataclass
class _Row:
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


class Engine:
    """Generates for many requests at once on one thread that owns the model.

    ``submit`` (any thread) validates a request and queues it; the engine thread admits queued requests at
    step boundaries, decodes every running row in one forward, and streams events to each request's channel.
    Keep other long-lived threads off torch: each keeps an OpenMP pool, and two live pools slow the engine's
    steps markedly on small machines (BENCHMARKS.md).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        manager: AdapterManager,
        config: EngineConfig,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if config.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)} (got {config.linear_kernel!r})")
        self.model, self.tokenizer, self.manager, self.config = model, tokenizer, manager, config
        self._on_step = on_step  # called on the engine thread with the batch size of each decode step
        self._eos = _eos_ids(model, tokenizer)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos, default=0)
        self._device = next(model.parameters()).device
        self._vocab_size: int = getattr(model, "get_input_embeddings")().num_embeddings  # noqa: B009
        self._queue: queue.Queue[_Row | None] = queue.Queue()
        self._deferred: collections.deque[_Row] = collections.deque()  # taken from the queue, over the budget
        self._stop_requested = False
        self._accepting = True
        self._rows: list[_Row] = []
        self._cache: GrowableCache | None = None
        self._mask: Tensor | None = None
        self._plan: RoutingPlan | None = None
        self.steps = 0
        self.linear_kernel = config.linear_kernel  # the one in use, set by the engine thread before it serves
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="loramux-engine", daemon=True)
        self._thread.start()
        ready.wait()

    # -- caller side (any thread) ---------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> EventChannel:
        """Validate and enqueue; errors for bad input, unknown adapters and full queues raise right here."""
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        row = self._admit_row(request)
        if self._queue.qsize() >= self.config.max_queued:
            raise CapacityExceededError(f"the queue holds {self.config.max_queued} requests already", field="queue")
        self._queue.put(row)
        return row.channel

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    @property
    def cached_rows(self) -> int:
        """Rows held in the KV cache (equals running_rows between steps)."""
        cache = self._cache
        return 0 if cache is None or not cache.layers else int(cache.layers[0].keys.shape[0])  # type: ignore[union-attr]

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._deferred)

    def load(self) -> EngineLoad:
        """A snapshot of the batch and the queue, from any thread (read-only; a row may be mid-admission)."""
        rows = list(self._rows)
        with self._queue.mutex:  # queue.Queue's own lock, held only to copy its items
            waiting = [*self._deferred, *(r for r in self._queue.queue if r is not None)]
        return EngineLoad(
            running=len(rows),
            waiting=len(waiting),
            running_adapters=frozenset(r.adapter.name for r in rows if r.adapter is not None),
            waiting_adapters=frozenset(r.adapter.name for r in waiting if r.adapter is not None),
            steps=self.steps,
        )

    def stop_accepting(self) -> None:
        self._accepting = False

    def close(self, *, timeout: float | None = None) -> None:
        """Stop the engine thread; anything still queued or running ends with ShuttingDownError."""
        self._accepting = False
        self._queue.put(None)
        self._thread.join(timeout)

    def _admit_row(self, request: GenerationRequest) -> _Row:
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
        return _Row(
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
        vocab = self._vocab_size
        ids = list(prompt)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidArgumentError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", field="token_ids"
            )
        return ids

    # -- engine thread --------------------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        try:  # on this thread: the only one that runs the model's torch ops (see the class docstring)
            self.linear_kernel = use_linear_kernel(self.model, self.config.linear_kernel)
        finally:
            ready.set()
        stop = False
        while not stop:
            stop = self._take_new(block=not self._rows)
            self._drop_finished()
            try:
                with torch.no_grad():
                    if self._rows:
                        self._decode_step()
            except Exception as exc:  # a bug or OOM: end this batch's rows, keep serving
                log.exception("decode step failed")
                self._fail_all(EngineFailure("generation failed inside the engine"), exc)
            self._drop_finished()
        self._fail_all(ShuttingDownError("the server shut down before this request finished"), None)
        self._drain_queue()

    def _take_new(self, *, block: bool) -> bool:
        """Admit queued requests up to the row limit and the prefill budget. Returns True when asked to stop."""
        new: list[_Row] = []
        stop = False
        while len(self._rows) + len(new) < self.config.max_batch_rows:
            row = self._next_queued(block=block and not new)
            if row is None:
                stop = self._stop_requested
                break
            if row.channel.cancelled.is_set():
                row.channel.put(RequestCancelledError("the request was cancelled before it started"))
            elif new and not _fits_prefill(new, row, self.config.max_prefill_tokens):
                self._deferred.appendleft(row)  # first in line at the next step
                break
            else:
                new.append(row)
        if new:
            try:
                with torch.no_grad():
                    self._prefill(new)
            except Exception:
                log.exception("prefill failed")
                for row in new:
                    row.channel.put(EngineFailure("generation failed inside the engine"))
                    row.channel.cancel()  # if it joined the batch before the failure, it leaves at the next step
        return stop

    def _next_queued(self, *, block: bool) -> _Row | None:
        """The next request: deferred ones first, then the queue. None when there is none now (or on stop)."""
        if self._deferred:
            return self._deferred.popleft()
        if self._stop_requested:
            return None
        try:
            row = self._queue.get(block=block)
        except queue.Empty:
            return None
        if row is None:
            self._stop_requested = True
        return row

    def _prefill(self, new: list[_Row]) -> None:
        ids, mask = kv_batch.left_pad([r.prompt_ids for r in new], pad_id=self._pad, device=self._device)
        cache, plan = GrowableCache(), self.manager.plan([r.adapter for r in new])
        with use_plan(plan):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=kv_batch.prefill_positions(mask),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if self._cache is None or self._mask is None:  # the new rows are the whole batch: so is their plan
            self._cache, self._mask, self._plan = cache, mask, plan
        else:
            self._mask = kv_batch.merge(self._cache, self._mask, cache, mask)
            if self._plan is not None:  # the new rows join the decode plan at its end, like the cache
                self._plan = extend_plan(self._plan, _weights(self._rows), _weights(new))
        self._rows.extend(new)
        self._emit(new, out.logits[:, -1, :])

    def _decode_step(self) -> None:
        assert self._cache is not None and self._mask is not None
        rows = self._rows
        if self._plan is None:
            self._plan = self.manager.plan([r.adapter for r in rows])
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self._device)  # (N, 1)
        positions = kv_batch.next_positions(self._mask)  # (N, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        with use_plan(self._plan):
            out = self.model(
                input_ids=ids,
                attention_mask=self._mask,
                position_ids=positions,
                past_key_values=self._cache,
                use_cache=True,
            )
        self.steps += 1
        if self._on_step is not None:
            self._on_step(len(rows))
        self._emit(rows, out.logits[:, -1, :])

    def _emit(self, rows: Sequence[_Row], logits: Tensor) -> None:
        """Sample one token per row (N, V) -> events; marks rows that finished."""
        tokens = sample_next_tokens(logits.float(), [r.sampler for r in rows]).tolist()
        events: list[tuple[EventChannel, TokenDelta]] = []
        for row, token in zip(rows, tokens, strict=True):
            row.last_token = token
            row.generated += 1
            is_eos = token in self._eos and not row.request.ignore_eos
            delta, stopped = row.text.push(token) if not is_eos else ("", False)
            if stopped:
                row.finish = FinishReason.STOP_SEQUENCE
            elif is_eos:
                row.finish = FinishReason.EOS
            elif row.generated >= row.max_new_tokens:
                row.finish = FinishReason.LENGTH
            if row.finish is not None and row.finish is not FinishReason.STOP_SEQUENCE:
                delta += row.text.flush()
                if row.text.stopped:
                    row.finish = FinishReason.STOP_SEQUENCE
            token_ids = () if is_eos or stopped else (token,)
            if delta or token_ids:
                events.append((row.channel, TokenDelta(text=delta, token_ids=token_ids)))
        deliver(events)

    def _drop_finished(self) -> None:
        """Rows that finished or were cancelled leave; the last rows fill their places (swap_remove), so the
        KV cache is re-selected but the routing plan only copies the moved rows."""
        removed = {i for i, r in enumerate(self._rows) if r.finish is not None or r.channel.cancelled.is_set()}
        if not removed:
            return
        deliver(
            [
                (row.channel, self._finished_event(row, row.finish))
                if row.finish is not None
                else (row.channel, RequestCancelledError("the request was cancelled"))
                for row in (self._rows[i] for i in sorted(removed))
            ]
        )
        order, moves = swap_remove(len(self._rows), removed)
        self._rows = [self._rows[i] for i in order]
        if not self._rows:
            self._cache, self._mask, self._plan = None, None, None
            return
        assert self._cache is not None and self._mask is not None
        self._mask = kv_batch.select_rows(self._cache, self._mask, order)
        if self._plan is not None:
            self._plan = self._plan.compact(moves, len(order))

    @staticmethod
    def _finished_event(row: _Row, reason: FinishReason) -> Finished:
        return Finished(
            reason=reason,
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=row.generated,
            adapter=row.adapter.name if row.adapter is not None else None,
            adapter_version=row.adapter.version if row.adapter is not None else 0,
            stop_sequence=row.text.matched_stop,
            seed=None if row.request.sampling.greedy else row.sampler.seed,
        )

    def _fail_all(self, error: LoramuxError, cause: BaseException | None) -> None:
        for row in self._rows:
            error.__cause__ = cause
            row.channel.put(error)
        self._rows, self._cache, self._mask, self._plan = [], None, None, None

    def _drain_queue(self) -> None:
        while self._deferred:
            self._deferred.popleft().channel.put(ShuttingDownError("the server shut down before this request started"))
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                return
            if row is not None:
                row.channel.put(ShuttingDownError("the server shut down before this request started"))


def _fits_prefill(new: Sequence[_Row], row: _Row, budget: int) -> bool:
    """Would prefilling ``new`` plus ``row`` stay within budget padded tokens (rows x longest prompt)?"""
    longest = max(len(row.prompt_ids), *(len(r.prompt_ids) for r in new))
    return (len(new) + 1) * longest <= budget


def _weights(rows: Sequence[_Row]) -> list[AdapterWeights | None]:
    return [r.adapter.weights if r.adapter is not None else None for r in rows]


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}
