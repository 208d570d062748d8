"""The oneDNN linear kernel: same module, same parameters, same outputs to fp32 rounding; nn.Linear under autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loramux.core.model.linear_kernels import (
    LinearKernel,
    OneDnnLinear,
    onednn_dtypes,
    onednn_works,
    use_linear_kernel,
)
from tests.conftest import bare_logits, build_base, input_ids

pytestmark = pytest.mark.skipif(not onednn_works(), reason="this torch build has no working oneDNN linear")


def test_switching_changes_only_the_class_of_plain_linears() -> None:
    model = build_base("llama")
    before = {k: v for k, v in model.state_dict().items()}
    params = {name: id(p) for name, p in model.named_parameters()}
    linears = [m for m in model.modules() if type(m) is nn.Linear]

    assert use_linear_kernel(model, LinearKernel.ONEDNN) == LinearKernel.ONEDNN

    assert linears and all(type(m) is OneDnnLinear for m in linears)
    assert {name: id(p) for name, p in model.named_parameters()} == params
    assert model.state_dict().keys() == before.keys()
    assert use_linear_kernel(model, LinearKernel.TORCH) == LinearKernel.TORCH
    assert all(type(m) is nn.Linear for m in linears)


def test_subclasses_of_linear_are_left_alone() -> None:
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(Custom(4, 4), nn.Linear(4, 4))
    use_linear_kernel(model, LinearKernel.ONEDNN)
    assert type(model[0]) is Custom and type(model[1]) is OneDnnLinear


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_logits_match_torch_gemm(arch: str) -> None:
    torch_model = build_base(arch, hidden=64)
    onednn_model = copy.deepcopy(torch_model)
    use_linear_kernel(onednn_model, LinearKernel.ONEDNN)
    ids = input_ids(3)

    expected, got = bare_logits(torch_model, ids), bare_logits(onednn_model, ids)

    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (1, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_forward_matches_linear(shape: tuple[int, ...], bias: bool) -> None:
    layer = nn.Linear(16, 24, bias=bias)
    fast = copy.deepcopy(layer)
    fast.__class__ = OneDnnLinear
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(fast(x), layer(x), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(fast(x), layer(x), atol=1e-5, rtol=1e-5)


def test_autograd_runs_torch_linear_and_trains() -> None:
    layer = nn.Linear(8, 4)
    layer.__class__ = OneDnnLinear
    x = torch.randn(3, 8)
    layer(x).sum().backward()  # oneDNN's op has no autograd kernel: this would warn and leave no gradient
    assert layer.weight.grad is not None
    assert torch.allclose(layer.weight.grad, x.sum(0).expand(4, 8))


def test_other_inputs_fall_back_to_torch() -> None:
    layer = nn.Linear(8, 4).double()
    layer.__class__ = OneDnnLinear
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        empty = layer.float()(torch.randn(0, 8))
    assert empty.shape == (0, 4)


def test_unknown_kernel_is_refused() -> None:
    with pytest.raises(TypeError, match="kernel must be a LinearKernel"):
        use_linear_kernel(nn.Linear(2, 2), "cublas")  # type: ignore[arg-type]


def test_without_onednn_the_model_keeps_torch_gemm(monkeypatch, caplog) -> None:
    import loramux.core.model.linear_kernels as kernels

    monkeypatch.setattr(kernels, "onednn_works", lambda: False)
    model = nn.Sequential(nn.Linear(4, 4))
    assert use_linear_kernel(model, LinearKernel.ONEDNN) == LinearKernel.TORCH
    assert type(model[0]) is nn.Linear
    assert "oneDNN linear is not available" in caplog.text


def _packed(layer: nn.Module) -> torch.Tensor | None:
    cached = layer.__dict__.get("_onednn_packed")
    return None if cached is None else cached[1]


def test_weights_are_packed_once_at_switch_and_reused() -> None:
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))
    use_linear_kernel(model, LinearKernel.ONEDNN)
    packed = [_packed(m) for m in model]
    assert all(p is not None and p.is_mkldnn for p in packed)
    with torch.no_grad():
        model(torch.randn(3, 16))
    assert [_packed(m) for m in model] == packed  # the same objects: not re-packed per call


def test_a_changed_weight_is_repacked() -> None:
    layer = nn.Linear(16, 24)
    reference = copy.deepcopy(layer)
    use_linear_kernel(layer, LinearKernel.ONEDNN)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2)  # in place: the same storage, a new version
        reference.weight.mul_(2)
        assert torch.allclose(layer(x), reference(x), atol=1e-5, rtol=1e-5)
        layer.weight = nn.Parameter(torch.randn(24, 16))  # another tensor
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_copies_and_pickles_leave_the_packed_weight_behind() -> None:
    import io

    layer = nn.Linear(16, 24)
    use_linear_kernel(layer, LinearKernel.ONEDNN)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = layer(x)
        replica = copy.deepcopy(layer)  # opaque oneDNN tensors can be neither deep-copied nor pickled
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert _packed(replica) is None and _packed(loaded) is None
        assert torch.allclose(replica(x), expected) and torch.allclose(loaded(x), expected)
    assert _packed(layer) is not None


def test_switching_back_to_torch_frees_the_packed_weights() -> None:
    layer = nn.Linear(16, 24)
    use_linear_kernel(layer, LinearKernel.ONEDNN)
    assert _packed(layer) is not None
    use_linear_kernel(layer, LinearKernel.TORCH)
    assert _packed(layer) is None


def test_weights_on_other_dtypes_are_not_packed() -> None:
    layer = nn.Linear(16, 24).double()
    use_linear_kernel(layer, LinearKernel.ONEDNN)
    assert type(layer) is OneDnnLinear and _packed(layer) is None


@pytest.mark.skipif(
    torch.bfloat16 not in onednn_dtypes(), reason="this CPU's oneDNN has no bf16 linear (it needs AVX-512 BW/VL/DQ)"
)
@pytest.mark.parametrize("rows", [1, 8, 64, 300])
def test_bf16_packed_forward_matches_linear(rows: int) -> None:
    """bf16 weights are packed too; any row count runs on the one packed weight."""
    layer = nn.Linear(64, 96).to(torch.bfloat16)
    reference = copy.deepcopy(layer)
    use_linear_kernel(layer, LinearKernel.ONEDNN)
    assert _packed(layer) is not None
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = layer(x), reference(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_bf16_where_onednn_cannot_run_it_stays_on_torchs_linear(monkeypatch) -> None:
    """An AVX2-only CPU's oneDNN refuses bf16: such a layer is never packed and runs F.linear, unchanged."""
    import loramux.core.model.linear_kernels as kernels

    monkeypatch.setattr(kernels, "onednn_dtypes", lambda: frozenset({torch.float32}))
    layer = nn.Linear(64, 96).to(torch.bfloat16)
    reference = copy.deepcopy(layer)
    use_linear_kernel(layer, LinearKernel.ONEDNN)
    assert type(layer) is OneDnnLinear and _packed(layer) is None
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))
    assert _packed(layer) is None


def test_weights_too_large_for_the_memory_available_run_unpacked(monkeypatch, caplog) -> None:
    import loramux.core.model.linear_kernels as kernels

    layer = nn.Linear(64, 96)
    reference = copy.deepcopy(layer)
    monkeypatch.setattr(kernels, "available_memory_bytes", lambda: 2 * 64 * 96 * 4 - 1)  # copies need half + 1
    assert use_linear_kernel(layer, LinearKernel.ONEDNN) == LinearKernel.ONEDNN
    assert type(layer) is OneDnnLinear and not layer.packs and _packed(layer) is None
    assert "not packing linear weights for oneDNN" in caplog.text
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    assert _packed(layer) is None  # never packed lazily either
    monkeypatch.setattr(kernels, "available_memory_bytes", lambda: 2 * 64 * 96 * 4)
    use_linear_kernel(layer, LinearKernel.TORCH)
    use_linear_kernel(layer, LinearKernel.ONEDNN)  # enough now: packed
    assert layer.packs and _packed(layer) is not None
