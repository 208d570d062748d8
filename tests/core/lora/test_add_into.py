"""Route.add_into: a decode step's delta added into a column slice of a fused GEMM's output, bit for bit what the
route's forward adds to its own base output, and nothing outside the slice; Route.native_lora: the same add as a
native call (the grouped kernel's), made here as decode_layer.c makes it."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch
from torch import Tensor, nn

from loramux.core.lora.gathered import GatheredLinear
from loramux.core.lora.grouped import GroupedLinear
from loramux.core.lora.native_kernel import GroupedKernel, load_grouped_kernel
from loramux.core.lora.route import Route
from loramux.core.lora.routing import UniformLinear
from loramux.core.lora.weights import LinearLora
from loramux.core.native import NativeLora

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
        "uniform": UniformLinear(a, kernel=kernel),
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


def native_add(call: NativeLora, x: Tensor, out: Tensor) -> int:
    """What decode_layer.c's add_lora does with a route's NativeLora: out (N, out) += the delta of x (N, in)."""
    if call.adapters == 0:
        return 0
    p, i = ctypes.c_void_p, ctypes.c_int64
    add = ctypes.CFUNCTYPE(ctypes.c_int, p, i, p, i, *[p] * 6, i, i, i, p, i, ctypes.c_int)(call.add)
    pointers = (call.a_ptrs, call.b_ptrs, call.ranks, call.scales, call.rows, call.offsets)
    return add(
        out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0), *pointers, call.adapters, x.shape[-1],
        out.shape[-1], call.scratch, call.scratch_stride, torch.get_num_threads(),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["uniform", "grouped", "distinct", "no-rows"])
def test_the_native_call_adds_what_add_into_adds(kernel, kind) -> None:
    route = routes(kernel)[kind]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 1, D_IN, generator=g)
    wide = torch.randn(5, 1, LEFT + D_OUT + RIGHT, generator=g)
    by_python, by_native = wide.clone(), wide.clone()
    with torch.no_grad():
        assert route.adds_into(x)
        route.add_into(x, by_python.view(5, -1)[:, LEFT : LEFT + D_OUT])
        call = route.native_lora(5)
        assert call is not None
        assert native_add(call, x.view(5, D_IN), by_native.view(5, -1)[:, LEFT : LEFT + D_OUT]) == 0
    if kind == "uniform":  # torch's two matmuls, scaling folded into B, against the kernel's sums
        torch.testing.assert_close(by_native, by_python, rtol=1e-5, atol=1e-5)
        assert not torch.equal(by_native, wide)
    else:  # the same kernel, the same segments
        assert torch.equal(by_native, by_python)
    assert torch.equal(by_native[..., :LEFT], wide[..., :LEFT])
    assert torch.equal(by_native[..., -RIGHT:], wide[..., -RIGHT:])


def test_the_uniform_routes_call_covers_the_rows_asked_for(kernel) -> None:
    route = routes(kernel)["uniform"]
    x, out = torch.randn(3, D_IN), torch.zeros(3, D_OUT)
    three = route.native_lora(3)
    assert three is not None and route.native_lora(3) is three  # built once a row count
    assert native_add(three, x, out) == 0
    torch.testing.assert_close(out, x @ route.At @ route.Bt, rtol=1e-5, atol=1e-5)
    assert route.native_lora(2) is not three


def test_routes_without_a_native_call(kernel) -> None:
    biased = LinearLora(lora(1).At, lora(1).Bt, torch.ones(D_OUT), 1.0)
    assert UniformLinear(lora(1)).native_lora(5) is None  # no kernel: torch's ops, from Python
    assert UniformLinear(biased, kernel=kernel).native_lora(5) is None  # the kernel adds no LoRA bias
    double = LinearLora(lora(1).At.double(), lora(1).Bt.double(), None, 1.0)
    assert UniformLinear(double, kernel=kernel).native_lora(5) is None  # the kernel adds fp32 only
    assert GroupedLinear([lora(1), lora(1)]).native_lora(2) is None
    assert GatheredLinear([lora(1), lora(2)]).native_lora(2) is None


def test_a_refused_native_call_says_so(kernel) -> None:
    route = GroupedLinear([lora(1), None], kernel=kernel)
    assert route.segments is not None
    route.segments.ranks.fill_(0)  # the kernel checks ranks before it writes anything
    out = torch.zeros(2, D_OUT)
    call = route.native_lora(2)
    assert call is not None
    assert native_add(call, torch.randn(2, D_IN), out) != 0
    assert not out.any()
