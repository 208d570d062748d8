"""The segmented (prefill) route: each run of rows on one adapter times that adapter's own weights, no stacks;
the same deltas as the gathered route (and so PEFT's: tests/core/lora/test_parity.py runs its batch layouts
through the prefill plan too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramux.core.lora.routing import GatheredLinear, build_plan
from loramux.core.lora.segmented import SegmentedLinear, runs
from loramux.core.lora.weights import AdapterWeights, LinearLora

D_IN, D_OUT = 24, 20


def lora(seed: int, rank: int, *, bias: bool = False) -> LinearLora:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(D_OUT, generator=g) if bias else None
    return LinearLora(torch.randn(D_IN, rank, generator=g), torch.randn(rank, D_OUT, generator=g), b, 0.5 + seed)


def test_runs_are_maximal_and_skip_base_rows():
    a, b = lora(0, 4), lora(1, 4)
    assert runs([a, a, None, a, b, b, None]) == [(a, 0, 2), (a, 3, 4), (b, 4, 6)]
    assert runs([None, None]) == []


LAYOUTS = {
    "sorted by adapter": [0, 0, 0, 1, 1, 2],
    "interleaved, with base rows": [0, None, 1, 0, 0, None, 2, 1],
    "one adapter": [1, 1, 1],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_segmented_equals_gathered(layout, tokens, grad):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    loras = [lora(0, 4), lora(1, 8), lora(2, 2, bias=True)]  # ranks differ; one has a LoRA bias
    rows = [loras[i] if i is not None else None for i in LAYOUTS[layout]]
    x = torch.randn(len(rows), tokens, D_IN, generator=torch.Generator().manual_seed(5))
    with torch.set_grad_enabled(grad):
        got = SegmentedLinear(rows).forward(base, x, (), {})
        want = GatheredLinear(rows).forward(base, x, (), {})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    base_rows = [i for i, lo in enumerate(rows) if lo is None]
    if base_rows:  # exactly the base output: nothing was added to them
        with torch.no_grad():
            assert torch.equal(got[base_rows], base(x)[base_rows])


def test_a_half_precision_base_gets_the_delta_added_in_the_lora_dtype():
    """PEFT: the fp32 delta is added to the fp16 base output (promoted) and the sum cast back once."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(torch.float16)
    lo = lora(3, 4)
    x = torch.randn(2, 3, D_IN).to(torch.float16)
    with torch.no_grad():
        got = SegmentedLinear([lo, None]).forward(base, x, (), {})
        out = base(x[0])
        want = (out + (x[0].float() @ lo.At @ lo.Bt) * lo.scaling).to(torch.float16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got[0], want, atol=1e-3, rtol=1e-3)


def test_a_prefill_plan_copies_no_weights():
    """The prefill plan's routes hold the adapters' own tensors, not stacks of them (what kept a server's peak
    memory one adapter per joining row above its adapters)."""
    adapters = [AdapterWeights(linear={"proj": lora(i, 4)}) for i in range(3)]
    rows = [adapters[0], adapters[1], adapters[1], None, adapters[2]]
    route = build_plan(rows, segmented=True).routes["proj"]
    assert isinstance(route, SegmentedLinear)
    held = [lo for lo, _, _ in route.runs]
    assert [id(lo) for lo in held] == [id(a.linear["proj"]) for a in (adapters[0], adapters[1], adapters[2])]
