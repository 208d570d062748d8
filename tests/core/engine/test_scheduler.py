"""The scheduler's admission rule on plain objects: no model, no tokenizer, no threads."""

from __future__ import annotations

from dataclasses import dataclass

from loramux.core.engine.scheduler import Readiness, Scheduler


@dataclass(eq=False)
class Req:
    name: str
    prompt: int = 4
    adapter: str | None = None
    state: Readiness = Readiness.READY


def scheduler(
    *requests: Req,
    max_rows: int = 4,
    prefill_tokens: int = 64,
    chunk_tokens: int = 32,
    join_wait_steps: int = 0,
    join_fraction: float = 0.0,
) -> Scheduler[Req]:
    s: Scheduler[Req] = Scheduler(
        max_rows=max_rows,
        prefill_tokens=prefill_tokens,
        chunk_tokens=chunk_tokens,
        prompt_len=lambda r: r.prompt,
        state=lambda r: r.state,
        key=lambda r: r.adapter,
        join_wait_steps=join_wait_steps,
        join_fraction=join_fraction,
    )
    for r in requests:
        s.add(r)
    return s


def names(items: list[Req]) -> list[str]:
    return [r.name for r in items]


def test_empty_queue_admits_nothing():
    step = scheduler().next_step(running=0, chunking=False)
    assert (step.prefill, step.chunked, step.dropped, step.empty) == ([], None, [], True)


def test_arrival_order_up_to_the_free_rows():
    s = scheduler(*(Req(str(i)) for i in range(6)), max_rows=4)
    assert names(s.next_step(running=1, chunking=False).prefill) == ["0", "1", "2"]
    assert names(list(s)) == ["3", "4", "5"] and len(s) == 3
    assert s.next_step(running=4, chunking=False).empty  # the batch is full


def test_dropped_requests_leave_from_anywhere_without_taking_a_row():
    drop = Readiness.DROP
    s = scheduler(Req("a", state=drop), Req("b"), Req("c", state=drop), Req("d"), Req("e"), max_rows=2)
    step = s.next_step(running=0, chunking=False)
    assert names(step.prefill) == ["b", "d"] and names(step.dropped) == ["a", "c"]
    assert names(list(s)) == ["e"] and len(s) == 1


def test_a_request_whose_adapter_is_loading_waits_and_does_not_block_others():
    loading = Req("x1", adapter="x", state=Readiness.WAIT)
    s = scheduler(loading, Req("x2", adapter="x"), Req("y1", adapter="y"), max_rows=4)
    assert names(s.next_step(running=0, chunking=False).prefill) == ["y1"]  # x2 stays behind x1: same adapter
    assert names(list(s)) == ["x1", "x2"]
    loading.state = Readiness.READY
    assert names(s.next_step(running=1, chunking=False).prefill) == ["x1", "x2"]


def test_a_prefill_group_holds_each_adapters_rows_together():
    # who joins is round-robin (a0 b0 base0 a1 b1 base1 a2: 7 rows); within the group each adapter's rows
    # are next to each other, in their queue's order, so the prefill's LoRA route runs one matmul pair per
    # adapter instead of one per row
    a = [Req(f"a{i}", adapter="a") for i in range(4)]
    b = [Req(f"b{i}", adapter="b") for i in range(2)]
    base = [Req(f"base{i}") for i in range(3)]
    s = scheduler(a[0], b[0], a[1], base[0], a[2], b[1], base[1], a[3], base[2], max_rows=7)
    step = s.next_step(running=0, chunking=False)
    assert names(step.prefill) == ["a0", "a1", "a2", "b0", "b1", "base0", "base1"]
    assert names(list(s)) == ["base2", "a3"]  # "a" was served last: it goes to the back


def test_a_prefill_group_keeps_rows_of_similar_width_together_before_adapters():
    # the decode batch inherits the order, and ragged attention takes runs of similar length: a long row
    # between short ones would split them, so width (within a power of two) comes before the adapter
    s = scheduler(
        Req("a-short", prompt=4, adapter="a"),
        Req("a-long", prompt=20, adapter="a"),
        Req("b-long", prompt=20, adapter="b"),
        Req("b-short", prompt=4, adapter="b"),
        max_rows=4,
        prefill_tokens=100,
    )
    step = s.next_step(running=0, chunking=False)  # admitted a-short, b-long, a-long, b-short
    assert names(step.prefill) == ["a-short", "b-short", "b-long", "a-long"]


def test_queues_are_served_round_robin():
    burst = [Req(f"a{i}", adapter="a") for i in range(300)]
    s = scheduler(*burst, Req("b0", adapter="b"), Req("base0"), max_rows=3)
    assert names(s.next_step(running=0, chunking=False).prefill) == ["a0", "b0", "base0"]
    assert names(s.next_step(running=2, chunking=False).prefill) == ["a1"]
    s.add(Req("b1", adapter="b"))
    s.add(Req("c0", adapter="c"))
    # "a" was just served: the new queues "b" and "c", in arrival order, come before it
    assert names(s.next_step(running=1, chunking=False).prefill) == ["b1", "c0"]
    assert names(s.next_step(running=0, chunking=False).prefill) == ["a2", "a3", "a4"]


def test_a_late_request_on_another_adapter_gets_the_next_free_row():
    s = scheduler(*(Req(f"a{i}", adapter="a") for i in range(300)), max_rows=4)
    assert len(s.next_step(running=0, chunking=False).prefill) == 4
    s.add(Req("b", adapter="b"))
    assert names(s.next_step(running=3, chunking=False).prefill) == ["b"]


def test_prefill_budget_counts_padded_tokens_and_the_rest_waits_first_in_line():
    s = scheduler(Req("a", 10), Req("b", 20), Req("c", 30), Req("d", 4), Req("e", 4), prefill_tokens=64)
    assert names(s.next_step(running=0, chunking=False).prefill) == ["a", "b"]  # with c: 3 rows x 30 > 64
    assert names(list(s)) == ["c", "d", "e"]  # c first in line, nothing overtook it
    assert names(s.next_step(running=0, chunking=False).prefill) == ["c", "d"]  # 2 x 30 <= 64 < 3 x 30
    assert names(list(s)) == ["e"]


def test_prefill_budget_counts_each_rows_width_not_only_what_it_prefills():
    # rows whose prompts the prefix cache mostly holds: 8 tokens to prefill each, but 40 columns wide
    s: Scheduler[Req] = Scheduler(
        max_rows=8,
        prefill_tokens=100,
        chunk_tokens=32,
        prompt_len=lambda r: r.prompt,
        width=lambda r: r.prompt + 32,  # the cached part
        state=lambda r: r.state,
    )
    for i in range(5):
        s.add(Req(f"r{i}", 8))
    assert names(s.next_step(running=0, chunking=False).prefill) == ["r0", "r1"]  # 3 x 40 > 100
    assert names(s.next_step(running=2, chunking=False).prefill) == ["r2", "r3"]
    assert names(s.next_step(running=4, chunking=False).prefill) == ["r4"]


def test_a_lone_prompt_over_the_prefill_budget_is_still_admitted():
    s = scheduler(Req("big", 30), prefill_tokens=16, chunk_tokens=32)
    assert names(s.next_step(running=0, chunking=False).prefill) == ["big"]


def test_long_prompts_are_chunked_one_at_a_time_and_hold_a_row():
    s = scheduler(Req("short"), Req("long1", 100), Req("long2", 100), Req("after"), max_rows=4)
    step = s.next_step(running=0, chunking=False)
    assert names(step.prefill) == ["short"] and step.chunked is not None and step.chunked.name == "long1"
    assert names(list(s)) == ["long2", "after"]  # long2 is next in its queue; nothing overtakes it there
    step = s.next_step(running=1, chunking=True)
    assert step.empty
    step = s.next_step(running=2, chunking=False)
    assert step.chunked is not None and step.chunked.name == "long2" and names(step.prefill) == ["after"]


def test_a_long_prompt_waiting_for_its_turn_holds_up_only_its_own_queue():
    s = scheduler(Req("long-a", 100, adapter="a"), Req("a2", adapter="a"), Req("b1", adapter="b"))
    step = s.next_step(running=0, chunking=True)  # another long prompt is being chunked
    assert names(step.prefill) == ["b1"] and step.chunked is None and names(list(s)) == ["long-a", "a2"]


def test_a_chunked_prompt_counts_against_the_rows():
    s = scheduler(Req("a"), Req("b"), max_rows=2)
    assert s.next_step(running=1, chunking=True).empty


def test_drain_empties_the_queues():
    s = scheduler(Req("a"), Req("b", adapter="x"))
    assert sorted(names(s.drain())) == ["a", "b"] and len(s) == 0


def test_while_rows_run_a_small_group_waits_for_company_at_most_join_wait_steps():
    s = scheduler(Req("r0"), max_rows=32, join_wait_steps=3, join_fraction=0.25)
    assert s.next_step(running=16, chunking=False).empty  # 1 ready < 16 x 0.25: it waits (its step 0)
    s.add(Req("r1", adapter="x"))
    assert s.next_step(running=16, chunking=False).empty  # 2 < 4, r0 waited 1 step
    assert s.next_step(running=16, chunking=False).empty  # r0 waited 2 steps
    assert names(s.next_step(running=16, chunking=False).prefill) == ["r0", "r1"]  # r0 waited 3: all join


def test_a_group_with_enough_company_joins_at_once():
    s = scheduler(*(Req(f"r{i}", adapter=str(i)) for i in range(4)), max_rows=32, join_wait_steps=8, join_fraction=0.25)
    assert names(s.next_step(running=16, chunking=False).prefill) == ["r0", "r1", "r2", "r3"]  # 4 >= 16 x 0.25


def test_an_idle_batch_or_a_nearly_full_one_never_makes_a_request_wait():
    s = scheduler(Req("r0"), max_rows=8, join_wait_steps=8, join_fraction=1.0)
    assert names(s.next_step(running=0, chunking=False).prefill) == ["r0"]  # nothing runs: no reason to wait
    s.add(Req("r1"))
    assert names(s.next_step(running=7, chunking=False).prefill) == ["r1"]  # one row free: the group is full


def test_requests_whose_adapter_loads_are_not_counted_as_company():
    loading = Req("x", adapter="x", state=Readiness.WAIT)
    s = scheduler(Req("r0"), loading, max_rows=32, join_wait_steps=2, join_fraction=0.1)
    assert s.next_step(running=16, chunking=False).empty  # 1 ready < 2 (x loads)
    loading.state = Readiness.READY
    assert names(s.next_step(running=16, chunking=False).prefill) == ["r0", "x"]


def test_a_long_prompt_starts_its_chunks_while_short_ones_wait_for_company():
    s = scheduler(Req("long", 100), Req("short"), max_rows=32, join_wait_steps=4, join_fraction=0.5)
    step = s.next_step(running=8, chunking=False)
    assert step.chunked is not None and step.chunked.name == "long" and step.prefill == []
