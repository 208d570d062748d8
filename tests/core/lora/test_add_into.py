"""Route.add_into: a decode step's delta added into a column slice of a fused GEMM's output, bit for bit what the
route's forward adds to its own base output, and nothing outside the slice."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from loramux.core.lora.gathered import GatheredLinear
from loramux.core.lora.grouped import GroupedLinear
from loramux.core.lora.native_kernel import GroupedKernel, load_grouped_kernel
from loramux.core.lora.route import Route
from loramux.core.lora.routing import UniformLinear
from loramux.core.lora.weights import LinearLora

D_IN, D_OUT, LEFT, RIGHT = 40, 150, 24, 70  # the slice sits between other members' columns


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> GroupedKernel:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the kernel")
    return load_grouped_kernel(cache_dir=tmp_path_factory.mktemp("native"))


def lora(seed: int, rank: int = 8) -> LinearLora:
    g = torch.Generator().manual_seed(seed)
    return LinearLora(torch.randn(D_IN, rank, generator=g), torch.randn(rank, D_OUT, generator=g), None, 0.5 + seed)


def routes(kernel: GroupedKernel) -> dict[str, Route]:
    a, b, c = lora(1), lora(2), lora(3, rank=16)
    return {
        "uniform": UniformLinear(a),
        "grouped": GroupedLinear([a, None, a, b, b], kernel=kernel),
        "distinct": GroupedLinear([a, b, c, None, lora(4)], kernel=kernel),  # one-row segments
        "no-rows": GroupedLinear([None] * 5, kernel=kernel),
    }


@pytest.mark.parametrize("kind", ["uniform", "grouped", "distinct", "no-rows"])
def test_add_into_a_slice_equals_the_forward_bit_for_bit(kernel, kind) -> None:
    route = routes(kernel)[kind]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 1, D_IN, generator=g)
    base = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        assert route.adds_into(x)
        want = route.forward(base, x, (), {})  # (5, 1, out)
        wide = torch.randn(5, 1, LEFT + D_OUT + RIGHT, generator=g)  # (N, 1, sum out): a fused GEMM's output
        wide[..., LEFT : LEFT + D_OUT] = base(x)
        before = wide.clone()
        route.add_into(x, wide.view(5, -1)[:, LEFT : LEFT + D_OUT])
    assert torch.equal(wide[..., LEFT : LEFT + D_OUT], want)
    assert torch.equal(wide[..., :LEFT], before[..., :LEFT]) and torch.equal(wide[..., -RIGHT:], before[..., -RIGHT:])


def test_what_add_into_does_not_take(kernel) -> None:
    every = routes(kernel)
    x = torch.randn(5, 1, D_IN)
    with torch.no_grad():
        assert not every["uniform"].adds_into(torch.randn(5, 3, D_IN))  # several tokens a row (a prefill)
        assert not every["grouped"].adds_into(torch.randn(5, 3, D_IN))
        assert not every["grouped"].adds_into(x.double())
        assert not every["grouped"].adds_into(torch.randn(5, 1, 2 * D_IN)[..., ::2])  # no unit column stride
        assert not GroupedLinear([lora(1), lora(1)]).adds_into(x[:2])  # torch's grouped ops: the module runs
        assert not GatheredLinear([lora(1), lora(2)]).adds_into(x[:2])  # its stacks add faster into its own
        biased = LinearLora(lora(1).At, lora(1).Bt, torch.ones(D_OUT), 1.0)
        assert not UniformLinear(biased).adds_into(x)
    assert not every["uniform"].adds_into(x)  # autograd on: the forward's out-of-place ops
