"""The scheduler's admission rule on plain objects: no model, no tokenizer, no threads."""

from __future__ import annotations

from dataclasses import dataclass

from loramux.core.engine.scheduler import Scheduler


@dataclass
class Req:
    name: str
    prompt: int = 4
    cancelled: bool = False


def scheduler(*requests: Req, max_rows: int = 4, prefill_tokens: int = 64, chunk_tokens: int = 32) -> Scheduler[Req]:
    s: Scheduler[Req] = Scheduler(
        max_rows=max_rows,
        prefill_tokens=prefill_tokens,
        chunk_tokens=chunk_tokens,
        prompt_len=lambda r: r.prompt,
        cancelled=lambda r: r.cancelled,
    )
    for r in requests:
        s.add(r)
    return s


def names(items: list[Req]) -> list[str]:
    return [r.name for r in items]


def test_empty_queue_admits_nothing():
    step = scheduler().next_step(running=0, chunking=False)
    assert (step.prefill, step.chunked, step.cancelled) == ([], None, [])


def test_arrival_order_up_to_the_free_rows():
    s = scheduler(*(Req(str(i)) for i in range(6)), max_rows=4)
    assert names(s.next_step(running=1, chunking=False).prefill) == ["0", "1", "2"]
    assert names(list(s)) == ["3", "4", "5"]
    assert s.next_step(running=4, chunking=False).prefill == []  # the batch is full


def test_cancelled_requests_leave_without_taking_a_row():
    s = scheduler(Req("a", cancelled=True), Req("b"), Req("c", cancelled=True), Req("d"), max_rows=2)
    step = s.next_step(running=0, chunking=False)
    assert names(step.prefill) == ["b", "d"] and names(step.cancelled) == ["a", "c"] and len(s) == 0


def test_prefill_budget_counts_padded_tokens_and_the_rest_waits_first_in_line():
    s = scheduler(Req("a", 10), Req("b", 20), Req("c", 30), Req("d", 4), Req("e", 4), prefill_tokens=64)
    assert names(s.next_step(running=0, chunking=False).prefill) == ["a", "b"]  # with c: 3 rows x 30 > 64
    assert names(list(s)) == ["c", "d", "e"]  # c first in line, nothing overtook it
    assert names(s.next_step(running=0, chunking=False).prefill) == ["c", "d"]  # 2 x 30 <= 64 < 3 x 30
    assert names(list(s)) == ["e"]


def test_a_lone_prompt_over_the_prefill_budget_is_still_admitted():
    s = scheduler(Req("big", 30), prefill_tokens=16, chunk_tokens=32)
    assert names(s.next_step(running=0, chunking=False).prefill) == ["big"]


def test_long_prompts_are_chunked_one_at_a_time_and_hold_a_row():
    s = scheduler(Req("short"), Req("long1", 100), Req("long2", 100), Req("after"), max_rows=4)
    step = s.next_step(running=0, chunking=False)
    assert names(step.prefill) == ["short"] and step.chunked is not None and step.chunked.name == "long1"
    assert names(list(s)) == ["long2", "after"]  # long2 is next; nothing overtakes it
    step = s.next_step(running=1, chunking=True)
    assert step.prefill == [] and step.chunked is None
    step = s.next_step(running=2, chunking=False)
    assert step.chunked is not None and step.chunked.name == "long2" and names(step.prefill) == ["after"]


def test_a_chunked_prompt_counts_against_the_rows():
    s = scheduler(Req("a"), Req("b"), max_rows=2)
    assert names(s.next_step(running=1, chunking=True).prefill) == []


def test_drain_empties_the_queue_in_order():
    s = scheduler(Req("a"), Req("b"))
    assert names(s.drain()) == ["a", "b"] and len(s) == 0
