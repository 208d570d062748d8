"""Weights moved into memory advised for huge pages: the same values, views and Parameters, in one mapping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from loramux.core.engine.config import EngineConfig
from loramux.core.model.fused_linears import FUSED, fused_groups, fused_layers
from loramux.core.model.huge_pages import HugePagePolicy, huge_page_policy, move_to_huge_pages
from loramux.core.model.kernel_choice import start_linear_kernels
from loramux.core.model.linear_kernels import LinearKernel
from loramux.core.model.native_linear import native_linear
from tests.core.model.test_fused_linears import tiny_llama


def mid_llama() -> LlamaForCausalLM:
    """Large enough that its MLP and fused weights reach MIN_BYTES (1 MiB), small enough for a unit test."""
    return tiny_llama(hidden=256, intermediate=1024)


def _pointers(modules: list[nn.Module]) -> dict[int, int]:
    return {id(p): p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def _mapping_flags(address: int) -> str:
    """The VmFlags line of this process's mapping that holds ``address`` (Linux's /proc/self/smaps)."""
    holds = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            holds = low <= address < high
        elif line.startswith("VmFlags:") and holds:
            return line
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("kernel", [LinearKernel.NATIVE, LinearKernel.ONEDNN, LinearKernel.TORCH])
def test_a_started_model_on_huge_pages_computes_the_same_logits_bit_for_bit(kernel: LinearKernel) -> None:
    if kernel is LinearKernel.NATIVE and isinstance(reason := native_linear(), str):
        pytest.skip(f"the native linear kernel does not run here: {reason}")
    model, reference = mid_llama(), mid_llama()  # a fixed kernel: auto's timings could choose apart
    rows = {"max_batch_rows": 4, "prefill_rows": 16}
    start_linear_kernels(reference, kernel, **rows)
    start_linear_kernels(model, kernel, **rows, huge_pages=True)
    before, after = _pointers([reference, *fused_layers(reference)]), _pointers([model, *fused_layers(model)])
    assert len(before) == len(after)
    big = [p for m in (model, *fused_layers(model)) for p in m.parameters() if p.untyped_storage().nbytes() >= 1 << 20]
    assert big  # the MLP's weights, and the fused groups' where there are some
    if sys.platform == "linux" and huge_page_policy() is not HugePagePolicy.NEVER:
        assert all(" hg" in _mapping_flags(p.data_ptr()) for p in big)  # advised MADV_HUGEPAGE
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for group in fused_groups(model):
            assert group.usable_at(1) is group.fused_at(1)  # members still its views: the group still runs fused
        assert torch.equal(model(ids).logits, reference(ids).logits)
        one = ids[:1, :1]
        assert torch.equal(model(one).logits, reference(one).logits)  # the decode-row kernels


def test_every_view_and_parameter_follows_the_move() -> None:
    model = tiny_llama(layers=1)
    start_linear_kernels(model, LinearKernel.ONEDNN, max_batch_rows=2, prefill_rows=4)
    attention = model.model.layers[0].self_attn
    group = attention.q_proj.__dict__[FUSED]
    params = {name: p for name, p in model.named_parameters()}
    values = {name: p.detach().clone() for name, p in params.items()}
    old = {name: p.untyped_storage().data_ptr() for name, p in params.items()}
    move = move_to_huge_pages([model, *fused_layers(model)], policy=HugePagePolicy.MADVISE, min_bytes=0)
    assert move.storages >= 1 and move.nbytes > 0 and "moved" in move.describe()
    for name, p in model.named_parameters():
        assert p is params[name]  # the same Parameter objects: routes and FusedSiblings hold them
        assert p.untyped_storage().data_ptr() != old[name]
        assert torch.equal(p, values[name])
    fused = group.layer.weight.untyped_storage().data_ptr()
    assert all(m.weight.untyped_storage().data_ptr() == fused for m in group.members)  # still views of it
    with torch.no_grad():
        assert group.usable_at(1)
        attention.q_proj.weight.zero_()  # a write through a member shows in the group's GEMM weight: one memory
    assert not group.layer.weight[: attention.q_proj.out_features].any()


def test_small_tensors_and_the_never_policy_leave_everything_in_place() -> None:
    model = tiny_llama(layers=1)
    old = {name: p.data_ptr() for name, p in model.named_parameters()}
    for move in (
        move_to_huge_pages([model], policy=HugePagePolicy.MADVISE),  # every tensor under MIN_BYTES
        move_to_huge_pages([model], policy=HugePagePolicy.NEVER, min_bytes=0),
    ):
        assert (move.storages, move.nbytes) == (0, 0) and "stay" in move.describe()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == old


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("always [madvise] never\n", HugePagePolicy.MADVISE),
        ("[always] madvise never\n", HugePagePolicy.ALWAYS),
        ("always madvise [never]\n", HugePagePolicy.NEVER),
        ("garbled\n", HugePagePolicy.UNKNOWN),
    ],
)
def test_the_policy_is_the_bracketed_word(tmp_path: Path, text: str, policy: HugePagePolicy) -> None:
    path = tmp_path / "enabled"
    path.write_text(text)
    assert huge_page_policy(path) is policy
    assert huge_page_policy(tmp_path / "missing") is HugePagePolicy.UNKNOWN


def test_the_engine_config_takes_only_a_bool() -> None:
    assert EngineConfig().huge_page_weights is True
    assert EngineConfig(huge_page_weights=False).linear_kernel_options()["huge_pages"] is False
    with pytest.raises(ValueError, match="huge_page_weights must be a bool"):
        EngineConfig(huge_page_weights="yes")  # type: ignore[arg-type]
