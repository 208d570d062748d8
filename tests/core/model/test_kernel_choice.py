"""--linear-kernel auto: each layer runs, at each row count, the kernel that was measured faster there."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loramux.core.model.linear_kernels as kernels
from loramux.core.model.kernel_choice import choose_kernels, row_buckets, start_linear_kernels
from loramux.core.model.linear_kernels import LinearKernel, OneDnnLinear, onednn_works, use_linear_kernel

pytestmark = pytest.mark.skipif(not onednn_works(), reason="this torch build has no working oneDNN linear")


def two_shapes() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 48))


def fake_timer(onednn_faster_up_to: dict[int, int]):
    """oneDNN faster up to a row count that depends on the layer's in_features; counts the cells timed."""
    cells: list[tuple[LinearKernel, int, int]] = []

    def timer(kernel: LinearKernel, module: nn.Linear, rows: int) -> float:
        cells.append((kernel, module.in_features, rows))
        onednn_wins = rows <= onednn_faster_up_to[module.in_features]
        return 1e-3 if (kernel is LinearKernel.ONEDNN) == onednn_wins else 2e-3

    return timer, cells


def test_row_buckets_cover_decode_batches_and_a_prefill_chunk():
    assert row_buckets(max_batch_rows=32, prefill_rows=512) == (1, 4, 16, 32, 512)
    assert row_buckets(max_batch_rows=1, prefill_rows=64) == (1, 64)


def test_each_shape_is_timed_once_and_its_layers_follow_the_table(monkeypatch):
    model = two_shapes()
    reference = copy.deepcopy(model)
    timer, cells = fake_timer({32: 8, 48: 0})  # 32 -> 48: oneDNN up to 8 rows; 48 -> 32: torch always
    choice = choose_kernels(model, rows=(1, 8, 64), timer=timer)
    assert choice is not None
    assert len(cells) == 2 * 2 * 3  # two distinct shapes (the first and last layers share one), 2 kernels, 3 counts
    first, second, last = model[0], model[2], model[4]
    assert all(type(m) is OneDnnLinear for m in (first, second, last))
    onednn, torch_gemm = LinearKernel.ONEDNN, LinearKernel.TORCH
    assert first.kernel_rows == last.kernel_rows == ((1, onednn), (8, onednn), (64, torch_gemm))
    assert second.kernel_rows == ((1, torch_gemm), (8, torch_gemm), (64, torch_gemm))
    assert first.packs and last.packs and not second.packs  # torch everywhere: no packed copy
    assert choice.summary == "onednn 2/6, torch 4/6"
    assert "48x32 float32 rows=8: onednn 1.000 ms, torch 2.000 ms -> onednn" in choice.describe()

    calls: list[int] = []
    real = kernels._onednn_linear
    monkeypatch.setattr(kernels, "_onednn_linear", lambda x, w, b: calls.append(x.shape[0]) or real(x, w, b))
    for rows in (1, 5, 8, 9, 64, 300):  # 5 follows 8's choice; 9 and beyond follow 64's
        x = torch.randn(rows, 32)
        with torch.no_grad():
            got, want = model(x), reference(x)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [1, 1, 5, 5, 8, 8]  # the first and last layers, only up to 8 rows


def test_auto_measures_for_real_and_the_model_still_computes_the_same():
    model = two_shapes()
    reference = copy.deepcopy(model)
    kernel, choice = start_linear_kernels(model, LinearKernel.AUTO, max_batch_rows=4, prefill_rows=16)
    assert kernel is LinearKernel.AUTO and choice is not None
    assert {(t.in_features, t.rows) for t in choice.timings} == {(32, n) for n in (1, 4, 16)} | {
        (48, n) for n in (1, 4, 16)
    }
    assert all(t.onednn_s > 0 and t.torch_s > 0 for t in choice.timings)
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_an_explicit_kernel_clears_the_auto_table():
    model = two_shapes()
    timer, _ = fake_timer({32: 8, 48: 0})
    choose_kernels(model, rows=(1, 8), timer=timer)
    assert not model[2].packs
    use_linear_kernel(model, LinearKernel.TORCH)
    use_linear_kernel(model, LinearKernel.ONEDNN)
    assert all(type(m) is OneDnnLinear and m.kernel_rows is None and m.packs for m in (model[0], model[2]))
    with pytest.raises(ValueError, match="AUTO"):
        use_linear_kernel(model, LinearKernel.AUTO)


def test_onednn_straight_after_auto_runs_every_layer_on_onednn():
    model = two_shapes()
    timer, _ = fake_timer({32: 8, 48: 0})
    choose_kernels(model, rows=(1, 8), timer=timer)
    use_linear_kernel(model, LinearKernel.ONEDNN)  # no TORCH between: the layers are OneDnnLinear already
    assert all(type(m) is OneDnnLinear and m.kernel_rows is None and m.packs for m in (model[0], model[2]))


def test_without_a_dtype_onednn_runs_auto_leaves_every_layer_on_torch(monkeypatch):
    monkeypatch.setattr("loramux.core.model.kernel_choice.onednn_dtypes", lambda: frozenset())
    model = two_shapes()
    kernel, choice = start_linear_kernels(model, LinearKernel.AUTO, max_batch_rows=4, prefill_rows=16)
    assert kernel is LinearKernel.TORCH and choice is None
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))


@pytest.mark.parametrize("kernel", [LinearKernel.ONEDNN, LinearKernel.AUTO])
def test_start_builds_the_onednn_kernel_of_every_decode_row_count(monkeypatch, kernel):
    """At start, each oneDNN shape runs once at 1..max_batch_rows rows (oneDNN builds and caches a kernel per
    row count: then, not while serving); layers on torch's GEMM are not run."""
    calls: list[tuple[int, int]] = []
    real = kernels._onednn_linear
    monkeypatch.setattr(
        kernels, "_onednn_linear", lambda x, w, b: calls.append((x.shape[-1], x.shape[0])) or real(x, w, b)
    )
    model = two_shapes()
    if kernel is LinearKernel.AUTO:  # 32 -> 48: oneDNN up to 4 rows; 48 -> 32: torch always
        timer, _ = fake_timer({32: 4, 48: 0})
        monkeypatch.setattr("loramux.core.model.kernel_choice._time_kernel", timer)
    start_linear_kernels(model, kernel, max_batch_rows=6, prefill_rows=16)
    if kernel is LinearKernel.ONEDNN:
        assert sorted(set(calls)) == [(i, n) for i in (32, 48) for n in range(1, 7)]
    else:  # the table's row counts: 1 and 4 on oneDNN, 6 (bucket 16) on torch
        assert sorted(set(calls)) == [(32, n) for n in range(1, 5)]
