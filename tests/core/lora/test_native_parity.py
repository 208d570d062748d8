"""The native grouped-LoRA kernel against PEFT: batches whose rows share adapters, one token a row (a decode
step's shape, where the kernel runs), routed through a decode plan whose workspace holds the kernel, give row
by row the logits PEFT gives for that row alone (the tolerance of test_parity)."""

from __future__ import annotations

import functools
import shutil

import pytest

from loramux.core.adapters import manager as manager_module
from loramux.core.lora.native_kernel import GroupedKernel, load_grouped_kernel
from loramux.core.lora.routing import build_plan
from loramux.core.lora.workspace import RoutingWorkspace
from tests.conftest import ARCHS, input_ids
from tests.core.lora.test_native_kernel import count_kernel_calls
from tests.core.lora.test_parity import ROW_LAYOUTS, assert_parity, load_key_mix

GROUPED = {name: ROW_LAYOUTS[name] for name in ("grouped", "grouped_with_base")}
GROUPED["grouped_skewed"] = ["patterned"] * 5 + ["emb", None, "emb", "patterned", "head_copy", "head_copy"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> GroupedKernel:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the kernel")
    return load_grouped_kernel(cache_dir=tmp_path_factory.mktemp("native"))


@pytest.mark.parametrize("layout", list(GROUPED))
@pytest.mark.parametrize("arch", ARCHS)
def test_native_grouped_rows_equal_each_row_alone_in_peft(
    arch, layout, kernel, fresh_model, base_models, make_adapter, monkeypatch
):
    workspace = RoutingWorkspace(rows=32, grouped_kernel=kernel)
    monkeypatch.setattr(manager_module, "build_plan", functools.partial(build_plan, workspace=workspace))
    calls = count_kernel_calls(monkeypatch)
    model, manager, peft_model = load_key_mix(arch, fresh_model, base_models, make_adapter)
    rows = GROUPED[layout]
    assert_parity(model, manager, peft_model, input_ids(len(rows), seed=11, seq_len=1), rows)
    assert calls, "the native kernel never ran"
