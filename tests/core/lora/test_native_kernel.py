"""The native grouped-LoRA kernel: built here, it adds exactly what torch's grouped route adds (so PEFT's deltas:
test_parity runs its batches through it too), in place, and only where it can; what happens when it cannot
build; and how --lora-kernel chooses it."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from loramux.core import native
from loramux.core.lora import kernel_choice as choice_module
from loramux.core.lora import native_kernel
from loramux.core.lora.grouped import GroupedLinear
from loramux.core.lora.kernel_choice import LoraKernel, start_lora_kernel
from loramux.core.lora.native_kernel import GroupedKernel, NativeKernelUnavailable, load_grouped_kernel, takes
from loramux.core.lora.routing import GatheredLinear, UniformLinear, linear_route, swap_remove
from loramux.core.lora.weights import LinearLora
from loramux.core.lora.workspace import RoutingWorkspace

needs_compiler = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler (gcc/cc) to build the kernel"
)

D_IN, D_OUT = 40, 150  # 150: two full column blocks of 64 and a tail of 22


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> GroupedKernel:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the kernel")
    return load_grouped_kernel(cache_dir=tmp_path_factory.mktemp("native"))


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each call of the kernel (which still runs)."""
    calls: list[int] = []
    real = GroupedKernel.add
    monkeypatch.setattr(GroupedKernel, "add", lambda self, *a: (calls.append(1), real(self, *a))[1])
    return calls


def lora(seed: int, rank: int) -> LinearLora:
    g = torch.Generator().manual_seed(seed)
    return LinearLora(torch.randn(D_IN, rank, generator=g), torch.randn(rank, D_OUT, generator=g), None, 0.5 + seed)


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT)


LAYOUTS = {
    "two adapters, even": [0, 1, 0, 1, 0, 1],
    "skewed, with base rows": [0, 0, 0, 0, None, 1, 0, None, 2, 0, 0, 0, 0, 0],  # 9 rows of adapter 0: 3 blocks
    "one adapter and base rows": [None, 0, 0, None, 0],
}


def exact(rows: list[LinearLora | None], x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
    """The deltas added to the base output in float64, row by row: what both routes round."""
    with torch.no_grad():
        out = base(x).double()
        for i, lo in enumerate(rows):
            if lo is not None:
                out[i] += x[i].double() @ lo.At.double() @ lo.Bt.double() * lo.scaling
    return out


def assert_as_close_as_torch(got, want, rows, x, base) -> None:
    """The native result is within fp32 rounding of the exact one: no further from it than torch's own route
    (its sums run in another order), up to a factor for the order, and close to torch's result."""
    truth = exact(rows, x, base)
    native_error = (got.double() - truth).abs().max().item()
    torch_error = (want.double() - truth).abs().max().item()
    assert native_error <= 4 * torch_error + 1e-6 * truth.abs().max().item(), (native_error, torch_error)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_kernel_takes_fp32_cpu_loras_without_bias_up_to_rank_64():
    assert takes(lora(0, 1)) and takes(lora(0, 64))
    assert not takes(lora(0, 65))
    a = lora(0, 8)
    assert not takes(LinearLora(a.At.bfloat16(), a.Bt.bfloat16(), None, a.scaling))
    assert not takes(LinearLora(a.At, a.Bt, torch.zeros(D_OUT), a.scaling))
    assert not takes(LinearLora(a.At.t().contiguous().t(), a.Bt, None, a.scaling))  # not contiguous


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("ranks", [(4, 8, 2), (16, 16, 16), (20, 32, 7), (64, 40, 1)])  # compiled and generic
def test_native_route_equals_torch_route(kernel, base, layout, ranks):
    loras = [lora(i, r) for i, r in enumerate(ranks)]
    rows = [loras[i] if i is not None else None for i in LAYOUTS[layout]]
    x = torch.randn(len(rows), 1, D_IN, generator=torch.Generator().manual_seed(5))
    native = GroupedLinear(rows, kernel=kernel)
    assert native.native
    with torch.no_grad():
        got = native.forward(base, x, (), {})
        want = GroupedLinear(rows).forward(base, x, (), {})
    assert_as_close_as_torch(got, want, rows, x, base)
    base_rows = [i for i, lo in enumerate(rows) if lo is None]
    if base_rows:  # exactly the base output: nothing was added to them
        with torch.no_grad():
            assert torch.equal(got[base_rows], base(x)[base_rows])


def test_native_route_follows_joins_and_leaves(kernel, base):
    loras = [lora(0, 4), lora(1, 8), lora(3, 6)]
    rows = [loras[0], loras[0], loras[1], loras[1]]
    route = GroupedLinear(rows, kernel=kernel)
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
        assert_as_close_as_torch(got, want, rows, x[: len(rows)], base)


def test_what_the_kernel_does_not_take_runs_torch(kernel, base, monkeypatch):
    """Several tokens a row (a prefill), another dtype or a rank past 64: torch's ops, the same result."""
    calls = count_kernel_calls(monkeypatch)
    a, b = lora(0, 8), lora(1, 8)
    with torch.no_grad():
        route = GroupedLinear([a, b, a, b], kernel=kernel)
        x = torch.randn(4, 3, D_IN)
        torch.testing.assert_close(route.forward(base, x, (), {}), GroupedLinear([a, b, a, b]).forward(base, x, (), {}))
        assert calls == []
        route.forward(base, x[:, :1], (), {})
        assert calls == [1]
        wide = lora(2, 65)
        assert not GroupedLinear([wide, wide], kernel=kernel).native
        half = LinearLora(a.At.bfloat16(), a.Bt.bfloat16(), None, a.scaling)
        assert not GroupedLinear([half, half], kernel=kernel).native


def test_the_decode_plan_takes_the_kernel_from_its_workspace(kernel):
    a, b, c, d = lora(0, 8), lora(1, 8), lora(2, 8), lora(3, 8)
    native = RoutingWorkspace(rows=4, grouped_kernel=kernel)
    with_kernel = linear_route([a, b, a, b], workspace=native)
    without = linear_route([a, b, a, b], workspace=RoutingWorkspace(rows=4))
    assert isinstance(with_kernel, GroupedLinear) and with_kernel.native
    assert isinstance(without, GroupedLinear) and not without.native
    # distinct adapters too, in one-row segments (the decode step adds them into its fused GEMMs' columns);
    # without the kernel they stay on the gathered route's stacks
    distinct = linear_route([a, b, c, d], workspace=native)
    assert isinstance(distinct, GroupedLinear) and distinct.native
    assert isinstance(linear_route([a, b, c, d], workspace=RoutingWorkspace(rows=4)), GatheredLinear)
    assert isinstance(linear_route([a, a, a], workspace=native), UniformLinear)
    wide = lora(4, 65)  # a rank the kernel does not take: gathered, as without it
    assert isinstance(linear_route([a, b, wide], workspace=native), GatheredLinear)


def test_the_build_is_cached_per_machine_and_reused(tmp_path, monkeypatch):
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the kernel")
    first = load_grouped_kernel(cache_dir=tmp_path)
    monkeypatch.setattr(native, "compile_library", lambda *a: pytest.fail("compiled again"))
    assert load_grouped_kernel(cache_dir=tmp_path).path == first.path
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left


@needs_compiler
def test_concurrent_builds_each_load_a_whole_library(tmp_path):
    results: list[GroupedKernel | BaseException] = []

    def build() -> None:
        try:
            results.append(load_grouped_kernel(cache_dir=tmp_path))
        except BaseException as exc:  # reported by the assert below
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 3 and all(isinstance(r, GroupedKernel) for r in results), results
    assert sorted(os.listdir(tmp_path)) == [results[0].path.name]  # type: ignore[union-attr]


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(NativeKernelUnavailable, match="no C compiler"):
        load_grouped_kernel(cache_dir=tmp_path)


@needs_compiler
def test_a_failed_build_says_what_the_compiler_said(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(native_kernel, "SOURCE", broken)
    with pytest.raises(NativeKernelUnavailable, match="failed") as info:
        load_grouped_kernel(cache_dir=tmp_path / "cache")
    assert "broken.c" in str(info.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing half-built is left to load


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32))


def test_lora_kernel_torch_never_builds(monkeypatch):
    monkeypatch.setattr(choice_module, "load_grouped_kernel", lambda: pytest.fail("built"))
    assert start_lora_kernel(tiny_model(), LoraKernel.TORCH, max_batch_rows=8).kernel is None


def test_lora_kernel_auto_without_a_compiler_runs_torch_and_says_why(monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    chosen = start_lora_kernel(tiny_model(), LoraKernel.AUTO, max_batch_rows=8)
    assert chosen.kernel is None and "no C compiler" in (chosen.unavailable or "")
    assert "-> torch (no C compiler" in chosen.describe()


def test_lora_kernel_native_without_a_compiler_refuses_to_start(monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(NativeKernelUnavailable, match="no C compiler"):
        start_lora_kernel(tiny_model(), LoraKernel.NATIVE, max_batch_rows=8)


@needs_compiler
def test_lora_kernel_auto_keeps_the_faster_over_the_model_shapes(kernel, monkeypatch):
    monkeypatch.setattr(choice_module, "load_grouped_kernel", lambda: kernel)
    chosen = start_lora_kernel(tiny_model(), LoraKernel.AUTO, max_batch_rows=16)
    cells = {(t.in_features, t.out_features, t.rows, t.adapters) for t in chosen.timings}
    mixes = {(8, 2), (16, 4)}  # (rows, adapters): rows sharing a few adapters
    assert cells == {(d_in, d_out, *mix) for d_in, d_out in ((32, 48), (48, 32)) for mix in mixes}
    assert all(t.native_s > 0 and t.torch_s > 0 for t in chosen.timings)
    native_faster = sum(t.native_s for t in chosen.timings) <= sum(t.torch_s for t in chosen.timings)
    assert (chosen.kernel is kernel) == native_faster
    assert chosen.describe().endswith(f"torch/native {chosen.ratio:.2f}x")


def test_cache_key_changes_with_the_cpu(monkeypatch):
    compiler = shutil.which("gcc") or shutil.which("cc") or "/bin/true"
    key = native.build_key(compiler, native_kernel.SOURCE)
    monkeypatch.setattr(native, "cpu_identity", lambda: "model name: another CPU")
    assert native.build_key(compiler, native_kernel.SOURCE) != key


def test_source_ships_with_the_package():
    assert native_kernel.SOURCE.is_file()
    assert Path(native_kernel.SOURCE).suffix == ".c"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("per_adapter", [1, 2, 9])  # short segments: each thread whole adapters; 9: by phase
def test_both_schedules_of_the_kernel_equal_torch(kernel, base, threads, per_adapter):
    loras = [lora(i, r) for i, r in enumerate((8, 16, 32, 5, 64, 12))]
    rows = [loras[i % len(loras)] for i in range(len(loras) * per_adapter)] + [None]
    x = torch.randn(len(rows), 1, D_IN, generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = GroupedLinear(rows, kernel=kernel).forward(base, x, (), {})
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        want = GroupedLinear(rows).forward(base, x, (), {})
    assert_as_close_as_torch(got, want, rows, x, base)
