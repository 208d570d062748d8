"""The routing workspace: the decode plan's gathered stacks leased from it and given back, so the next plan
reuses the same memory, and plans built on it route exactly like fresh ones."""

from __future__ import annotations

import pytest
import torch

from loramux.core.lora.routing import GatheredLinear, build_plan, extend_plan, swap_remove, use_plan
from loramux.core.lora.workspace import RoutingWorkspace
from tests.conftest import input_ids, sfx
from tests.core.lora.test_routing import mixed_adapter_weights


def _like(rows: int = 0, *, r: int = 4, bias: bool = False):
    return (torch.empty(rows, 8, r), torch.empty(rows, r, 6), torch.empty(rows, 1, 6) if bias else None)


def test_a_lease_is_exclusive_and_given_back_buffers_are_reused():
    ws = RoutingWorkspace(rows=16)
    first = ws.take("q", _like(), rows=3)
    assert first[0].shape == (16, 8, 4) and first[2] is None  # allocated for the workspace's rows
    assert not first[0].any() and not first[1].any()  # zeroed: resident from the first use
    second = ws.take("q", _like(), rows=3)  # the first is leased: another set
    assert second[0].data_ptr() != first[0].data_ptr()
    ws.give("q", first)
    assert ws.nbytes == first[0].nbytes + first[1].nbytes
    again = ws.take("q", _like(), rows=16)
    assert again[0].data_ptr() == first[0].data_ptr() and ws.nbytes == 0  # the same memory, leased again
    ws.give("q", again)
    assert ws.take("q", _like(r=8), rows=2)[0].shape == (16, 8, 8)  # another rank: new buffers, old dropped
    assert ws.nbytes == 0
    ws.give("q", first)
    assert ws.take("q", _like(), rows=17)[0].shape == (17, 8, 4)  # more rows than kept: new, at least as many
    with pytest.raises(ValueError, match="rows"):
        RoutingWorkspace(rows=0)


def _gathered_ptrs(plan) -> dict[str, int]:
    return {name: route.At.data_ptr() for name, route in plan.routes.items() if isinstance(route, GatheredLinear)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plans_on_a_workspace_route_like_fresh_plans_and_reuse_its_memory(arch, fresh_model, make_adapter):
    """Rows join and leave as the engine has them (in place, rebuilt, gathered turning grouped and back); after
    each change the plan routes exactly like a fresh one. Then the plan is dropped and the next batch's plan,
    other rows, leases the very same buffers and still routes like a fresh plan."""
    model = fresh_model(arch)
    fourth = {"fourth": {"target_modules": [sfx(arch, "qkv"), sfx(arch, "down")], "r": 16}}
    weights = mixed_adapter_weights(model, arch, make_adapter, seed=3200, extra=fourth)
    ws = RoutingWorkspace(rows=12)
    ids = input_ids(12, seed=12)

    def check(plan, rows, what: str) -> None:
        fresh = build_plan([weights[r] for r in rows])
        with torch.no_grad():
            with use_plan(plan):
                got = model(input_ids=ids[: len(rows)]).logits
            with use_plan(fresh):
                expected = model(input_ids=ids[: len(rows)]).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=what)

    rows: list[str | None] = ["small", "fourth", None]
    plan = build_plan([weights[r] for r in rows], workspace=ws)
    check(plan, rows, "built")
    steps = [("join", ["other"]), ("join", ["small", "fourth", "small", "fourth"]), ("leave", {0, 2})]
    steps += [("join", ["big", None]), ("leave", {1, 3, 5}), ("join", ["small"])]
    for kind, change in steps:
        if kind == "join":
            plan = extend_plan(plan, [weights[r] for r in rows], [weights[r] for r in change], workspace=ws)
            rows = rows + list(change)
        else:
            order, moves = swap_remove(len(rows), set(change))
            plan = plan.compact(moves, len(order))
            rows = [rows[i] for i in order]
        check(plan, rows, f"after {kind} {change}")
    plan = build_plan([weights[r] for r in ["fourth", "small", "big"]], workspace=ws)  # mixed: gathered
    before = _gathered_ptrs(plan)
    assert before
    plan.release()
    kept = ws.nbytes
    assert kept > 0
    rows = ["big", None, "fourth", "small", "small"]
    plan = build_plan([weights[r] for r in rows], workspace=ws)
    after = _gathered_ptrs(plan)
    assert {n: after[n] for n in before if n in after} == {n: before[n] for n in after if n in before}
    assert ws.nbytes < kept  # what the new plan leased left the workspace
    check(plan, rows, "the next batch, on the same buffers")
