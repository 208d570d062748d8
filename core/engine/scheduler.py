"""Who joins the batch at the next step: pure decisions over the waiting requests, testable without a model.

The engine asks once per step (``next_step``), telling how many rows run and whether a long prompt is being
prefilled. Requests are taken in arrival order while the batch has rows free (a prompt being chunked holds
a row):

- a cancelled request leaves the queue (the engine tells its caller);
- a prompt longer than ``chunk_tokens`` is prefilled a chunk per step, one such prompt at a time; the next
  long one waits, first in line;
- the others are prefilled together while rows x longest prompt stays within ``prefill_tokens``; the first
  one that would not fit waits, first in line (a lone prompt always fits: it is never starved).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class StepAdmission(Generic[T]):
    """What joins at one step."""

    prefill: list[T] = field(default_factory=list)  # prefilled together, in this order
    chunked: T | None = None  # starts its chunked prefill
    cancelled: list[T] = field(default_factory=list)  # cancelled while waiting: they leave the queue


class Scheduler(Generic[T]):
    """The waiting requests and the admission rule above. Not thread-safe: the engine holds its own lock.

    ``prompt_len`` and ``cancelled`` read what the rule needs from a request, so tests use plain objects.
    """

    def __init__(
        self,
        *,
        max_rows: int,
        prefill_tokens: int,
        chunk_tokens: int,
        prompt_len: Callable[[T], int],
        cancelled: Callable[[T], bool],
    ) -> None:
        self.max_rows, self.prefill_tokens, self.chunk_tokens = max_rows, prefill_tokens, chunk_tokens
        self._prompt_len, self._cancelled = prompt_len, cancelled
        self._waiting: collections.deque[T] = collections.deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._waiting))

    def add(self, request: T) -> None:
        self._waiting.append(request)

    def drain(self) -> list[T]:
        """Every waiting request, oldest first; the queue is empty afterwards."""
        items = list(self._waiting)
        self._waiting.clear()
        return items

    def next_step(self, *, running: int, chunking: bool) -> StepAdmission[T]:
        step: StepAdmission[T] = StepAdmission()
        longest = 0  # of the prefill group
        while self._waiting and running + len(step.prefill) + (chunking or step.chunked is not None) < self.max_rows:
            request = self._waiting[0]
            length = self._prompt_len(request)
            if self._cancelled(request):
                step.cancelled.append(self._waiting.popleft())
            elif length > self.chunk_tokens:
                if chunking or step.chunked is not None:
                    break  # one long prompt at a time; this one is next
                step = StepAdmission(step.prefill, self._waiting.popleft(), step.cancelled)
            elif step.prefill and (len(step.prefill) + 1) * max(longest, length) > self.prefill_tokens:
                break  # first in line at the next step
            else:
                step.prefill.append(self._waiting.popleft())
                longest = max(longest, length)
        return step
