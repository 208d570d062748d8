"""The native LoRA decode kernel: what bmm computes, only where it applies, and torch ops when it cannot be built."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from core.adapter_manager import AdapterManager
from core.admission import EngineConfig
from core.lora_kernels import NATIVE, TORCH, NativeLoraDecode, load_lora_kernel
from core.routing import use_plan
from tests.conftest import input_ids

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def kernel() -> NativeLoraDecode:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine")
    built = load_lora_kernel(NATIVE)
    assert built is not None, "cc is here, so the kernel must build and pass its own check"
    return built


def _operands(rows: int, d_in: int, rank: int, d_out: int, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shapes = ((rows, 1, d_in), (rows, d_in, rank), (rows, rank, d_out), (rows, 1, d_out))
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


@pytest.mark.parametrize("rank", [16, 8, 5, 32])  # 16: the AVX-512 path where the CPU has it; others: any rank
@pytest.mark.parametrize(("rows", "d_in", "d_out"), [(1, 512, 512), (8, 512, 1376), (8, 1376, 512), (64, 96, 200)])
def test_matches_bmm(kernel: NativeLoraDecode, rows: int, d_in: int, rank: int, d_out: int) -> None:
    """As accurate as bmm: both sum in fp32, in different orders, so each is compared with a float64 result."""
    x, At, Bt, out = _operands(rows, d_in, rank, d_out)
    exact = torch.baddbmm(out.double(), torch.bmm(x.double(), At.double()), Bt.double())
    bmm = torch.baddbmm(out, torch.bmm(x, At), Bt)
    assert kernel.apply(out, x, At, Bt)
    kernel_error, bmm_error = ((t.double() - exact).abs().max().item() for t in (out, bmm))
    assert kernel_error <= 2 * bmm_error + 1e-6, (kernel_error, bmm_error)
    assert kernel_error <= 1e-6 * exact.abs().max().item() * d_in  # and small against the values themselves


@pytest.mark.parametrize(
    "case",
    ["two tokens per row", "float64", "a strided x", "autograd"],
)
def test_refuses_what_it_does_not_handle_and_changes_nothing(kernel: NativeLoraDecode, case: str) -> None:
    x, At, Bt, out = _operands(4, 32, 16, 48)
    if case == "two tokens per row":
        x, out = x.expand(4, 2, 32).contiguous(), out.expand(4, 2, 48).contiguous()
    elif case == "float64":
        x, At, Bt, out = (t.double() for t in (x, At, Bt, out))
    elif case == "a strided x":
        x = torch.randn(4, 1, 64)[..., ::2]
    else:
        At.requires_grad_(True)
    before = out.clone()
    assert not kernel.apply(out, x, At, Bt)
    assert torch.equal(out, before)


def test_torch_kernel_is_none_and_unknown_kinds_are_refused() -> None:
    assert load_lora_kernel(TORCH) is None
    with pytest.raises(ValueError, match="lora kernel must be one of native, torch"):
        load_lora_kernel("cuda")
    with pytest.raises(ValueError, match="lora_kernel must be one of native, torch"):
        EngineConfig(lora_kernel="fast")


@pytest.mark.parametrize(("compiler", "why"), [("no-such-compiler-here", "no C compiler"), ("false", "false failed")])
def test_without_a_working_compiler_torch_ops_are_used(compiler: str, why: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="core.lora_kernels"):
        assert load_lora_kernel(NATIVE, compiler=compiler) is None
    assert "native LoRA decode kernel unavailable" in caplog.text and why in caplog.text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_routed_decode_step_uses_the_kernel_and_matches_torch_ops(arch, fresh_model, make_adapter, kernel) -> None:
    """A decode step of a mixed batch: same logits with the kernel as with bmm, and the kernel did the work."""
    model = fresh_model(arch)
    manager = AdapterManager(model)
    for i, (name, rank) in enumerate((("a", 16), ("b", 8))):
        folder = make_adapter(arch, name, seed=4100 + i, r=rank, target_modules=PROJECTIONS)
        manager.load_adapter(str(folder), name)
    held = [manager.acquire(n) if n else None for n in ("a", "b", None, "a")]
    calls: list[int] = []

    class Counting:
        def apply(self, out, x, At, Bt):  # type: ignore[no-untyped-def]
            done = kernel.apply(out, x, At, Bt)
            calls.append(done)
            return done

    ids = input_ids(len(held), seq_len=1)  # one token per row: the decode shape
    with torch.no_grad():
        with use_plan(manager.plan(held, decode_kernel=Counting())):
            got = model(input_ids=ids).logits
        with use_plan(manager.plan(held)):
            want = model(input_ids=ids).logits
    assert calls and all(calls)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
