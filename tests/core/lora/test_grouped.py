"""The grouped route: rows grouped by adapter compute exactly the per-row deltas of the gathered route (and so
PEFT's: tests/core/lora/test_parity.py runs its "grouped" layouts through it), through joins and leaves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramux.core.lora.grouped import GroupedLinear, prefers_grouped
from loramux.core.lora.routing import GatheredLinear, UniformLinear, build_plan, linear_route, swap_remove
from loramux.core.lora.weights import AdapterWeights, LinearLora

D_IN, D_OUT = 24, 20


def lora(seed: int, rank: int) -> LinearLora:
    g = torch.Generator().manual_seed(seed)
    return LinearLora(torch.randn(D_IN, rank, generator=g), torch.randn(rank, D_OUT, generator=g), None, 0.5 + seed)


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT)


LAYOUTS = {
    "two adapters, even": [0, 1, 0, 1, 0, 1],
    "skewed, with base rows": [0, 0, 0, 0, None, 1, 0, None, 2, 0],
    "one adapter and base rows": [None, 0, 0, None, 0],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 5])
def test_grouped_equals_gathered(base, layout, tokens):
    loras = [lora(0, 4), lora(1, 8), lora(2, 2)]  # different ranks: padded to the largest
    rows = [loras[i] if i is not None else None for i in LAYOUTS[layout]]
    x = torch.randn(len(rows), tokens, D_IN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = GroupedLinear(rows).forward(base, x, (), {})
        want = GatheredLinear(rows).forward(base, x, (), {})
        by_hand = torch.stack(
            [base(x[i]) + (x[i] @ lo.At @ lo.Bt * lo.scaling if lo is not None else 0) for i, lo in enumerate(rows)]
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    base_rows = [i for i, lo in enumerate(rows) if lo is None]
    if base_rows:  # exactly the base output: nothing was added to them
        with torch.no_grad():
            assert torch.equal(got[base_rows], base(x)[base_rows])


def test_joins_and_leaves_regroup_like_a_fresh_route(base):
    loras = [lora(0, 4), lora(1, 4), lora(3, 6)]
    rows = [loras[0], loras[0], loras[1], loras[1]]
    route = GroupedLinear(rows)
    x = torch.randn(12, 1, D_IN)
    for kind, change in [("join", [loras[2], None, loras[2]]), ("leave", {0, 2}), ("leave", {1}), ("join", [loras[0]])]:
        if kind == "join":
            route.append(change)
            rows = rows + change
        else:
            order, moves = swap_remove(len(rows), change)
            route.compact(moves, len(order))
            rows = [rows[i] for i in order]
        with torch.no_grad():
            got = route.forward(base, x[: len(rows)], (), {})
            want = GroupedLinear(rows).forward(base, x[: len(rows)], (), {})
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=f"after {kind} {change}")


def test_the_route_follows_how_rows_share_adapters():
    a, b, c = lora(0, 4), lora(1, 4), lora(2, 4)
    assert isinstance(linear_route([a, a, a]), UniformLinear)
    assert isinstance(linear_route([a, b, a, b]), GroupedLinear)  # 2 rows per adapter
    assert isinstance(linear_route([a, b, c, a]), GatheredLinear)  # mostly distinct
    assert isinstance(linear_route([a, None, a, None]), GroupedLinear)
    biased = LinearLora(a.At, a.Bt, torch.zeros(D_OUT), 1.0)
    assert not prefers_grouped([biased, biased, a, a])  # a LoRA bias: the gathered route carries it


def test_a_plan_switches_route_when_rows_join():
    a, b, c, d = (AdapterWeights(linear={"m": lora(i, 4)}) for i in range(4))
    plan = build_plan([a, b, c, d])
    assert isinstance(plan.routes["m"], GatheredLinear)
    from loramux.core.lora.routing import extend_plan

    plan = extend_plan(plan, [a, b, c, d], [a, b, c, d])  # now 2 rows per adapter
    assert isinstance(plan.routes["m"], GroupedLinear)
    grouped = plan.routes["m"]
    plan = extend_plan(plan, [a, b, c, d] * 2, [a])  # still shared: extended in place
    assert plan.routes["m"] is grouped
