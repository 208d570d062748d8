"""What a caller asks the engine for and what it gets back: plain types, no tensors, no grpc."""

from __future__ import annotations

import asyncio
import enum
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from loramux.core.engine.sampling import SamplingParams
from loramux.core.errors import LoramuxError


class AdapterSelection(enum.Enum):
    """Symbolic adapter choices; a plain ``str`` names an adapter."""

    DEFAULT = "default"  # whatever the manager's default is when the request is admitted
    BASE = "base"  # the bare base model


class FinishReason(enum.Enum):
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    LENGTH = "length"
    STOP_TOKEN = "stop_token"  # one of the request's stop_token_ids


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user, assistant or tool
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the tokenizer's chat template (the generation prompt appended)."""

    messages: tuple[ChatMessage, ...]


Prompt = str | Sequence[int] | ChatPrompt  # text, token ids, or a conversation


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    adapter: str | AdapterSelection = AdapterSelection.DEFAULT
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int | None = None  # None: the engine's default
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    apply_chat_template: bool = False
    request_id: str = ""
    # A weighted mix of registered adapters instead of ``adapter``: (name, weight) pairs (loramux.core.lora.mix)
    adapter_mix: tuple[tuple[str, float], ...] = ()
    logprobs: bool = False  # each generated token's log-probability (TokenDelta.logprobs)
    top_logprobs: int = 0  # and this many most likely alternatives (0..MAX_TOP_LOGPROBS)
    prompt_logprobs: bool = False  # each prompt token's (after the first) in Finished.prompt_logprobs
    min_new_tokens: int = 0  # EOS and stop_token_ids are impossible, and stop strings not looked for, before
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the generation (FinishReason.STOP_TOKEN)


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability (log_softmax of the logits, fp32, before any sampling setting) and the most
    likely tokens at its position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    text: str  # new text only; may be "" while a multi-byte character or a possible stop is held back
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them


@dataclass(frozen=True)
class MixMember:
    name: str
    version: int
    weight: float


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None  # the adapter the request ran with (None: the base model, or a mix)
    adapter_version: int = 0  # that adapter's version (bumps on replace); 0 for the base model
    stop_sequence: str | None = None  # the stop string that ended the text, for STOP_SEQUENCE
    seed: int | None = None  # the sampling seed used (the drawn one when none was given); None if greedy
    stop_token_id: int | None = None  # for STOP_TOKEN
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # when asked: one per prompt token after the first
    adapter_mix: tuple[MixMember, ...] = ()  # the members as used, for a mixed request
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)


GenerationEvent = TokenDelta | Finished


class EventChannel:
    """Engine thread -> one consumer, sync or asyncio. Ends with Finished, or with an error raised."""

    def __init__(self, *, adapter: str | None = None, prompt_tokens: int = 0, mix: bool = False) -> None:
        self.adapter = adapter  # the adapter the request runs with, resolved at admission (None: base, or a mix)
        self.mix = mix  # it runs with a weighted mix of adapters
        self.prompt_tokens = prompt_tokens
        self._sync: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue[object] | None = None
        self.cancelled = threading.Event()
        self.on_cancel: Callable[[], None] | None = None  # the engine's: a waiting request leaves promptly

    def put(self, item: GenerationEvent | LoramuxError | BaseException) -> None:
        with self._lock:
            if self._loop is not None and self._async is not None:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            else:
                self._sync.put(item)

    def cancel(self) -> None:
        """Ask the engine to drop this request; it leaves the batch within one decode step."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        hook = self.on_cancel
        if hook is not None:
            hook()

    def __iter__(self) -> Iterator[GenerationEvent]:
        while True:
            item = self._sync.get()
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
            if isinstance(item, Finished):
                return

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        with self._lock:  # switch delivery to the loop, keeping what already arrived
            self._loop = asyncio.get_running_loop()
            self._async = asyncio.Queue()
            while not self._sync.empty():
                self._async.put_nowait(self._sync.get())
        while True:
            item = await self._async.get()
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
            if isinstance(item, Finished):
                return


def deliver(events: Sequence[tuple[EventChannel, GenerationEvent | BaseException]]) -> None:
    """Put many channels' events at once, in order: one wakeup per consuming event loop instead of one per
    event. A decode step makes an event for every row; waking the loop (and its thread) once per row steals
    the engine's cores and stalls its OpenMP workers, most at large batches."""
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[object], object]]] = {}
    for channel, item in events:
        with channel._lock:
            if channel._loop is not None and channel._async is not None:
                per_loop.setdefault(channel._loop, []).append((channel._async, item))
            else:
                channel._sync.put(item)
    for loop, items in per_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue[object], object]]) -> None:
    for target, item in items:
        target.put_nowait(item)
