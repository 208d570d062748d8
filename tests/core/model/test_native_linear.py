"""The native linear kernel: what it computes (against float64), where it runs, how --linear-kernel native and
auto put the model's layers on it, and what happens where it cannot run."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loramux.core.model.kernel_choice as choice_module
import loramux.core.model.linear_kernels as kernels
from loramux.core.model.kernel_choice import choose_kernels, start_linear_kernels
from loramux.core.model.linear_kernels import NATIVE_ROWS, LinearKernel, OneDnnLinear, onednn_works, use_linear_kernel
from loramux.core.model.native_linear import MAX_ROWS, NativeLinear, _self_check, load_native_linear, native_linear
from loramux.core.native import NativeKernelUnavailable
from tests.core.model.test_fused_linears import tiny_llama

NATIVE = native_linear()
needs_native = pytest.mark.skipif(isinstance(NATIVE, str), reason=f"the native linear kernel cannot run here: {NATIVE}")


@pytest.fixture
def kernel() -> NativeLinear:
    if isinstance(NATIVE, str):
        pytest.skip(f"the native linear kernel cannot run here: {NATIVE}")
    return NATIVE


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, MAX_ROWS])  # whole blocks of 8, a partial one, a second
@pytest.mark.parametrize(("d_in", "d_out"), [(512, 130), (40, 151), (1376, 1), (17, 64)])  # tails in and out
def test_the_kernel_computes_x_times_w_transposed_plus_bias(kernel, threads, rows, d_in, d_out):
    gen = torch.Generator().manual_seed(rows * d_in + d_out)
    weight, bias = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    x = torch.randn(rows, d_in, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in (None, bias):
            got = kernel(x, weight, b)
            assert got.shape == (rows, d_out) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), reference(x, weight, b), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_inputs_of_any_leading_shape_and_row_stride(kernel):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=gen)
    wide = torch.randn(5, 3, 64, generator=gen)
    for x in (wide[:, 1], wide[:, 1:2], wide.transpose(0, 1), wide[:, :, :64]):  # strided rows, (N, 1, d), (T, N, d)
        got = kernel(x, weight, None)
        assert got.shape == (*x.shape[:-1], 96)
        torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    column_strided = torch.randn(64, 4, generator=gen).T  # (4, 64), column stride 4: copied, still right
    torch.testing.assert_close(
        kernel(column_strided, weight, None), F.linear(column_strided, weight), rtol=1e-5, atol=1e-5
    )


def test_it_takes_only_what_it_computes(kernel):
    weight = torch.randn(8, 16)
    assert kernel.takes(torch.randn(MAX_ROWS, 16), weight)
    assert not kernel.takes(torch.randn(MAX_ROWS + 1, 16), weight)  # the general GEMMs' rows
    assert not kernel.takes(torch.randn(0, 16), weight)
    assert not kernel.takes(torch.randn(2, 16, dtype=torch.bfloat16), weight.bfloat16())
    assert not kernel.takes(torch.randn(2, 16), torch.randn(16, 8).T)  # a transposed (non-contiguous) weight
    assert not kernel.takes(torch.randn(2, 15), weight)


def test_copies_and_pickles_share_the_one_loaded_kernel(kernel):
    assert copy.copy(kernel) is kernel and copy.deepcopy(kernel) is kernel
    assert pickle.loads(pickle.dumps(kernel)) is kernel


def test_a_wrong_kernel_fails_its_self_check():
    class Zeros(NativeLinear):
        def __call__(self, x, weight, bias):
            return torch.zeros(x.shape[0], weight.shape[0])

    with pytest.raises(NativeKernelUnavailable, match="self-check at 1 rows"):
        _self_check(Zeros(path=None, _fn=None))  # type: ignore[arg-type]


def test_the_build_is_cached_and_reused(tmp_path, monkeypatch):
    if isinstance(NATIVE, str):
        pytest.skip(f"the native linear kernel cannot run here: {NATIVE}")
    first = load_native_linear(cache_dir=tmp_path)
    monkeypatch.setattr("loramux.core.native.compile_library", lambda *a: pytest.fail("compiled again"))
    assert load_native_linear(cache_dir=tmp_path).path == first.path
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def counting(monkeypatch) -> list[int]:
    """Rows of each native call (the kernel still runs)."""
    calls: list[int] = []
    real = NativeLinear.__call__
    monkeypatch.setattr(
        NativeLinear, "__call__", lambda self, x, w, b: calls.append(x.numel() // x.shape[-1]) or real(self, x, w, b)
    )
    return calls


def two_shapes() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))


def test_linear_kernel_native_runs_every_layer_on_it_up_to_its_rows(kernel, monkeypatch):
    model, want = two_shapes(), two_shapes()
    assert use_linear_kernel(model, LinearKernel.NATIVE) is LinearKernel.NATIVE
    assert all(type(m) is OneDnnLinear and m.kernel_rows == NATIVE_ROWS and not m.packs for m in (model[0], model[2]))
    calls = counting(monkeypatch)
    for rows in (1, 5, MAX_ROWS, MAX_ROWS + 1, 300):
        x = torch.randn(rows, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1, 5, 5, MAX_ROWS, MAX_ROWS]  # beyond its rows: torch's GEMM
    x = torch.randn(3, 32, requires_grad=True)
    model(x).sum().backward()  # autograd: plain nn.Linear, gradients flow
    assert x.grad is not None and len(calls) == 6
    use_linear_kernel(model, LinearKernel.TORCH)
    assert all(type(m) is nn.Linear and "native" not in m.__dict__ for m in (model[0], model[2]))


def test_linear_kernel_native_fuses_siblings_on_it(kernel, monkeypatch):
    model = tiny_llama(layers=1)
    used, choice = start_linear_kernels(model, LinearKernel.NATIVE, max_batch_rows=4, prefill_rows=16)
    assert used is LinearKernel.NATIVE and choice is None
    group = model.model.layers[0].mlp.up_proj.__dict__[kernels.FUSED]
    assert group.layer.kernel_rows == NATIVE_ROWS and group.layer.native is kernel
    calls = counting(monkeypatch)
    x = torch.randn(2, 32)
    with torch.no_grad():
        got = group.output_of(model.model.layers[0].mlp.gate_proj, x)
    assert calls == [2] and got is not None  # one native GEMM for gate and up
    torch.testing.assert_close(got, F.linear(x, model.model.layers[0].mlp.gate_proj.weight), rtol=1e-5, atol=1e-5)


def test_linear_kernel_native_where_it_cannot_run_refuses_to_start(monkeypatch):
    monkeypatch.setattr(kernels, "native_linear", lambda: "no C compiler (gcc or cc) on PATH")
    model = two_shapes()
    with pytest.raises(NativeKernelUnavailable, match="--linear-kernel native: no C compiler"):
        use_linear_kernel(model, LinearKernel.NATIVE)
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))  # nothing half-switched


@pytest.mark.skipif(not onednn_works(), reason="this torch build has no working oneDNN linear")
def test_auto_puts_each_row_count_on_the_fastest_of_three(kernel, monkeypatch):
    model, want = two_shapes(), two_shapes()
    cells: list[tuple[LinearKernel, int, int]] = []

    def timer(which: LinearKernel, module: nn.Linear, rows: int) -> float:
        cells.append((which, module.in_features, rows))
        if which is LinearKernel.NATIVE:  # native fastest up to 8 rows on 32 -> 48, never on 48 -> 32
            return 0.5e-3 if rows <= 8 and module.in_features == 32 else 3e-3
        return 1e-3 if which is LinearKernel.ONEDNN else 2e-3

    choice = choose_kernels(model, rows=(1, 8, 64, 512), timer=timer, native=kernel)
    assert choice is not None
    assert {c for c in cells if c[0] is LinearKernel.NATIVE} == {
        (LinearKernel.NATIVE, d, n) for d in (32, 48) for n in (1, 8, 64)
    }  # not at 512 rows: beyond the rows it takes
    native, onednn = LinearKernel.NATIVE, LinearKernel.ONEDNN
    assert model[0].kernel_rows == ((1, native), (8, native), (64, onednn), (512, onednn))
    assert model[2].kernel_rows == ((1, onednn), (8, onednn), (64, onednn), (512, onednn))
    assert choice.summary == "onednn 6/8, torch 0/8, native 2/8"
    described = choice.describe().splitlines()  # shapes are out x in
    assert "48x32 float32 rows=1: onednn 1.000 ms, torch 2.000 ms, native 0.500 ms -> native" in described
    assert "48x32 float32 rows=512: onednn 1.000 ms, torch 2.000 ms -> onednn" in described
    calls = counting(monkeypatch)
    for rows in (1, 5, 9):
        x = torch.randn(rows, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 5]  # the first layer, up to 8 rows


@pytest.mark.skipif(not onednn_works(), reason="this torch build has no working oneDNN linear")
def test_auto_without_the_native_kernel_times_two_and_says_why(monkeypatch):
    monkeypatch.setattr(choice_module, "native_linear", lambda: "no C compiler (gcc or cc) on PATH")
    model = two_shapes()
    used, choice = start_linear_kernels(model, LinearKernel.AUTO, max_batch_rows=4, prefill_rows=16)
    assert used is LinearKernel.AUTO and choice is not None
    assert all(t.native_s is None for t in choice.timings)
    assert "native" not in choice.summary
    assert choice.describe().endswith("native not timed: no C compiler (gcc or cc) on PATH")
    assert all(k is not LinearKernel.NATIVE for _, k in model[0].kernel_rows)


def test_source_ships_with_the_package():
    from loramux.core.model.native_linear import SOURCE

    assert SOURCE.is_file() and SOURCE.suffix == ".c"
