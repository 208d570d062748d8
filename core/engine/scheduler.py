"""Who joins the batch at the next step: pure decisions over the waiting requests, testable without a model.

Waiting requests are kept in one queue per adapter (``key``: the adapter's name, None for the base model),
each in arrival order, and admitted **round-robin across the queues**: after a queue gives a request, it goes
to the back of the line. So a tenant's burst of hundreds of requests does not hold up another tenant's one:
it waits for a free row, not for the burst (LoRAX's scheduler does the same).

The engine asks once per step (``next_step``), telling how many rows run and whether a long prompt is being
prefilled; ``state`` says of each waiting request whether it can start (its adapter is resident), must wait
(its adapter is loading), or leaves (cancelled, or its adapter failed to load). While the batch has rows free
(a prompt being chunked holds one):

- a prompt longer than ``chunk_tokens`` is prefilled a chunk per step, one such prompt at a time; its queue
  waits meanwhile (requests of one adapter keep their order);
- the others are prefilled together while rows x widest stays within ``prefill_tokens``, rows of similar
  width and then each queue's requests next to each other (``together``); the first that would not fit
  waits, first in its queue, and ends the step's group (a lone prompt always fits). A row's width
  (``width``) is its whole prompt, the part the prefix cache gives it included: its group holds and attends
  to all of it, so a burst of cache hits on a long shared prompt spreads over a few steps, and the first
  of them stream while the others wait, instead of all waiting for one long forward;
- with ``join_wait_steps`` (TGI's ``max_waiting_tokens`` and ``waiting_served_ratio`` do the same), while
  rows run, a prefill group smaller than ``join_fraction`` of the running rows (and than the free rows)
  waits for company, up to ``join_wait_steps`` steps after its oldest member became ready: one prompt's
  prefill costs a step however few rows it holds, so rows that trickle in (adapter loads finishing one by
  one) would otherwise each cost the whole batch a step;
- with a KV budget (``kv_fits``, given the final lengths of every row the batch would then hold), a request
  joins only if the batch stays within it until all its rows finish; otherwise its queue waits for rows to
  leave (``kv_blocked`` counts such requests at the last step).
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class Readiness(enum.Enum):
    READY = "ready"  # can join now
    WAIT = "wait"  # stays queued (its adapter is loading)
    DROP = "drop"  # leaves the queue now (cancelled, or it cannot run)


@dataclass(frozen=True)
class StepAdmission(Generic[T]):
    """What joins at one step, and what left the queue."""

    prefill: list[T] = field(default_factory=list)  # prefilled together, in this order (``together``)
    chunked: T | None = None  # starts its chunked prefill
    dropped: list[T] = field(default_factory=list)  # left the queue (Readiness.DROP)

    @property
    def empty(self) -> bool:
        return not self.prefill and self.chunked is None and not self.dropped


class Scheduler(Generic[T]):
    """The waiting requests and the admission rule above. Not thread-safe: the engine holds its own lock.

    ``key``, ``prompt_len`` (the tokens it prefills), ``width`` (its prompt's columns in a prefill group;
    default ``prompt_len``) and ``state`` read what the rule needs from a request, so tests use plain objects.
    """

    def __init__(
        self,
        *,
        max_rows: int,
        prefill_tokens: int,
        chunk_tokens: int,
        prompt_len: Callable[[T], int],
        state: Callable[[T], Readiness],
        key: Callable[[T], Hashable] = lambda _: None,
        final_len: Callable[[T], int] | None = None,
        width: Callable[[T], int] | None = None,
        kv_fits: Callable[[Sequence[int]], bool] | None = None,
        join_wait_steps: int = 0,
        join_fraction: float = 0.0,
    ) -> None:
        self.max_rows, self.prefill_tokens, self.chunk_tokens = max_rows, prefill_tokens, chunk_tokens
        self._prompt_len, self._state, self._key = prompt_len, state, key
        self._final_len, self._width, self._kv_fits = final_len or prompt_len, width or prompt_len, kv_fits
        self.kv_blocked = 0  # requests at the head of their queue that waited for KV room at the last step
        self._queues: dict[Hashable, collections.deque[T]] = {}
        # Next to serve first: queues not served since they (re)appeared, in arrival order, then the others in
        # the order they were last served (a served queue goes to the back).
        self._order: list[Hashable] = []
        self._served: set[Hashable] = set()
        self._count = 0
        self.join_wait_steps, self.join_fraction = join_wait_steps, join_fraction
        self._steps = 0  # next_step calls so far
        self._ready_since: dict[int, int] = {}  # id of a request that could join a prefill group: since step

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[T]:
        """Every waiting request (queue by queue)."""
        return iter([r for key in list(self._order) for r in tuple(self._queues[key])])

    def add(self, request: T) -> None:
        key = self._key(request)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            fresh = sum(1 for k in self._order if k not in self._served)
            self._order.insert(fresh, key)
        queue.append(request)
        self._count += 1

    def drain(self) -> list[T]:
        """Every waiting request; the queues are empty afterwards."""
        items = list(self)
        self._queues.clear()
        self._order.clear()
        self._served.clear()
        self._ready_since.clear()
        self._count = 0
        return items

    def next_step(self, *, running: int, chunking: bool, finals: Sequence[int] = ()) -> StepAdmission[T]:
        """``finals``: the final lengths of the rows running (and of a prompt being chunked), for kv_fits."""
        step: StepAdmission[T] = StepAdmission(dropped=self._drop())
        self._steps += 1
        hold = self._hold_group(running + chunking)  # the prefill group waits for company this step
        chunked: T | None = None
        widest = 0  # of the prefill group
        full = False  # the prefill group's budget is spent
        held = list(finals)  # final lengths of every row the batch holds, admitted ones included
        blocked: set[Hashable] = set()
        while not full and running + len(step.prefill) + (chunking or chunked is not None) < self.max_rows:
            progress = False
            for key in list(self._order):  # one request per queue per round; a served queue goes last
                if running + len(step.prefill) + (chunking or chunked is not None) >= self.max_rows:
                    break
                queue = self._queues[key]
                request = queue[0]
                if key in blocked or self._state(request) is not Readiness.READY:
                    continue
                if self._kv_fits is not None and not self._kv_fits([*held, self._final_len(request)]):
                    blocked.add(key)  # waits, first in its queue, for rows to leave
                    continue
                length, width = self._prompt_len(request), self._width(request)
                if length > self.chunk_tokens:
                    if chunking or chunked is not None:
                        continue  # one long prompt at a time; this queue waits for it
                    chunked = request
                elif hold:
                    continue
                elif step.prefill and (len(step.prefill) + 1) * max(widest, width) > self.prefill_tokens:
                    full = True  # first in its queue at the next step
                    break
                else:
                    step.prefill.append(request)
                    widest = max(widest, width)
                held.append(self._final_len(request))
                self._pop(key)
                progress = True
            if not progress:
                break
        self.kv_blocked = len(blocked)
        return StepAdmission(together(step.prefill, key=self._key, width=self._width), chunked, step.dropped)

    def _hold_group(self, busy: int) -> bool:
        """Whether this step's prefill group waits for company (see the module docstring); ``busy``: rows
        the batch holds (a prompt being chunked included)."""
        if self.join_wait_steps <= 0 or busy == 0:
            self._ready_since.clear()
            return False
        ready = [
            r
            for key in self._order
            for r in self._queues[key]
            if self._prompt_len(r) <= self.chunk_tokens and self._state(r) is Readiness.READY
        ]
        self._ready_since = {id(r): self._ready_since.get(id(r), self._steps) for r in ready}
        if not ready:
            return False
        company = min(self.max_rows - busy, max(1, math.ceil(self.join_fraction * busy)))
        oldest = min(self._ready_since.values())
        return len(ready) < company and self._steps - oldest < self.join_wait_steps

    def _pop(self, key: Hashable) -> None:
        queue = self._queues[key]
        queue.popleft()
        self._count -= 1
        self._order.remove(key)
        if queue:
            self._order.append(key)
            self._served.add(key)
        else:
            self._forget(key)

    def _forget(self, key: Hashable) -> None:
        """An empty queue goes; when its adapter has requests again, it is a fresh queue."""
        del self._queues[key]
        if key in self._order:
            self._order.remove(key)
        self._served.discard(key)

    def _drop(self) -> list[T]:
        """Requests anywhere in the queues that leave now, in queue order."""
        dropped: list[T] = []
        for key in list(self._order):
            queue = self._queues[key]
            leaving = [r for r in queue if self._state(r) is Readiness.DROP]
            if not leaving:
                continue
            gone = {id(r) for r in leaving}
            kept = [r for r in queue if id(r) not in gone]
            dropped += leaving
            self._count -= len(queue) - len(kept)
            if kept:
                self._queues[key] = collections.deque(kept)
            else:
                self._forget(key)
        return dropped


def together(requests: Sequence[T], *, key: Callable[[T], Hashable], width: Callable[[T], int]) -> list[T]:
    """``requests`` reordered: rows of similar width (within a power of two) next to each other, and within
    those each key's requests next to each other; classes and keys in order of first appearance, each key's
    requests in their order.

    Round-robin admission interleaves a group's adapters (a0 b0 a1 b1 ...), and the prefill's LoRA route
    (lora/segmented.py) runs a matmul pair per run of consecutive rows on one adapter: 64 rows over 8
    adapters took 64 pairs a module, 8 once grouped (the bench model's prefill of 64 x 32 tokens: +176 ms
    over no adapters interleaved, +71 ms grouped; BENCHMARKS.md). The decode batch inherits the order, and
    its ragged attention (model/ragged_attention.py) takes contiguous runs of similar length: grouping by
    adapter alone put a 300-token row between short ones and lost them, so width comes first. Who joins is
    decided before this; no row's output depends on the order."""
    classes: dict[int, dict[Hashable, list[T]]] = {}
    for request in requests:
        by_key = classes.setdefault(max(width(request), 1).bit_length(), {})
        by_key.setdefault(key(request), []).append(request)
    return [request for by_key in classes.values() for group in by_key.values() for request in group]
