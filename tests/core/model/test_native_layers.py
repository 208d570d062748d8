"""Native decode layers: the forward's logits to fp32 rounding and its greedy tokens (padding, ragged runs, Qwen2's
biases), a routed layer's LoRA added inside the native calls (or between them, or torch's ops), the probe that
refuses them, and auto's timing."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from loramux.core import AdapterManager, EngineConfig
from loramux.core.lora.native_kernel import load_grouped_kernel
from loramux.core.lora.routing import build_plan, use_plan
from loramux.core.lora.workspace import RoutingWorkspace
from loramux.core.model import native_layer_choice
from loramux.core.model.decode_step import decode_step_for
from loramux.core.model.decoder import Decoder
from loramux.core.model.huge_pages import move_to_huge_pages
from loramux.core.model.linear_kernels import LinearKernel
from loramux.core.model.native_layer_choice import StepTiming, attach_native_layers, within_tolerance
from loramux.core.model.native_layers import (
    DecodeLayers,
    NativeDecodeLayers,
    NativeLoras,
    native_layers,
    unsupported,
)
from tests.conftest import build_base
from tests.core.model.test_decode_step import decode_both, prepared

EVERY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
pytestmark = pytest.mark.skipif(
    isinstance(native_layers(build_base("llama")), str), reason="native decode layers cannot run on this machine"
)


def counted(monkeypatch) -> list[int]:
    """The layer indices native layers ran (one call of theirs a layer: the whole layer or its first), call by
    call."""
    calls: list[int] = []
    for name in ("attention_inputs", "whole_layer"):
        original = getattr(NativeDecodeLayers, name)

        def spy(self, index, *args, original=original):
            calls.append(index)
            return original(self, index, *args)

        monkeypatch.setattr(NativeDecodeLayers, name, spy)
    return calls


def assert_close(pairs) -> None:
    for i, (want, got) in enumerate(pairs):
        assert within_tolerance(want, got), f"step {i}: differs by {(want - got).abs().max().item():.3g}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kernel", [LinearKernel.AUTO, LinearKernel.TORCH])
def test_native_layers_give_the_forwards_logits_to_rounding_and_its_tokens(arch, kernel, monkeypatch) -> None:
    model = prepared(arch, kernel)
    step = decode_step_for(model)
    assert step is not None
    choice = attach_native_layers(model, step, mode=DecodeLayers.NATIVE, rows=(4,))
    assert not isinstance(choice, str), choice
    calls = counted(monkeypatch)
    pairs = decode_both(model, step, steps=4)
    assert_close(pairs)
    assert calls == [0, 1] * 4  # both layers, every step


def routed(rows: list[str | None], make_adapter) -> tuple:
    """The llama model on torch's GEMMs with native layers, adapters "a" and "b" on every projection of layer 1
    only, and a decode plan (the grouped kernel's) for rows."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the grouped LoRA kernel")
    model = prepared("llama", LinearKernel.TORCH)
    manager = AdapterManager(model)
    for name, seed in (("a", 1), ("b", 2)):
        folder = make_adapter("llama", name, seed=seed, target_modules=list(EVERY), layers_to_transform=[1])
        manager.load_adapter(str(folder), name)
    step = decode_step_for(model)
    assert step is not None
    assert not isinstance(attach_native_layers(model, step, mode=DecodeLayers.NATIVE, rows=(4,)), str)
    workspace = RoutingWorkspace(rows=len(rows), grouped_kernel=load_grouped_kernel())
    plan = build_plan([manager.acquire(r).weights if r else None for r in rows], workspace=workspace)
    assert len(plan.routes) == len(EVERY)
    return model, step, plan


def kinds(monkeypatch) -> list[str]:
    """What routes_of gave layer 1, call by call: "in C", "staged" or "torch"."""
    seen: list[str] = []
    original = NativeDecodeLayers.routes_of

    def spy(self, index, *args):
        lora = original(self, index, *args)
        if index == 1:
            seen.append("in C" if isinstance(lora, NativeLoras) else "staged" if isinstance(lora, tuple) else "torch")
        return lora

    monkeypatch.setattr(NativeDecodeLayers, "routes_of", spy)
    return seen


ROWS = {"uniform": ["a", "a", "a"], "grouped": ["a", None, "a"], "distinct": ["a", None, "b"]}


@pytest.mark.parametrize(
    ("rows", "kind"),
    [(r, "in C") for r in ROWS] + [("uniform", "staged"), ("distinct", "staged"), ("distinct", "torch")],
)
def test_routed_layers_add_their_lora_inside_the_native_calls_or_between_them(rows, kind, make_adapter, monkeypatch):
    model, step, plan = routed(ROWS[rows], make_adapter)
    base = decode_both(model, step, steps=2)
    for route in plan.routes.values():
        with torch.no_grad():  # as in a decode step
            assert route.adds_into(torch.zeros(3, 1, 32))
            assert route.native_lora(3) is not None
        if kind != "in C":  # no native call: add_into from Python, between the staged calls
            monkeypatch.setattr(route, "native_lora", lambda rows: None)
        if kind == "torch":
            monkeypatch.setattr(route, "adds_into", lambda x: False)
    seen, calls = kinds(monkeypatch), counted(monkeypatch)
    with use_plan(plan):
        got = decode_both(model, step, steps=2, routes=plan.routes)
    assert_close(got)
    assert seen == [kind] * 2
    assert calls == ([0] if kind == "torch" else [0, 1]) * 2  # layer 0 (no routes) native either way
    assert not torch.allclose(got[0][0][0], base[0][0][0])  # the adapter's rows moved
    if ROWS[rows][1] is None:
        assert within_tolerance(base[0][0][1:2], got[0][0][1:2])  # the base row did not


@pytest.mark.parametrize("rows", list(ROWS))
def test_lora_inside_the_native_calls_equals_the_staged_calls(rows, make_adapter, monkeypatch) -> None:
    model, step, plan = routed(ROWS[rows], make_adapter)
    with use_plan(plan):
        inside = decode_both(model, step, steps=3, routes=plan.routes)
        for route in plan.routes.values():
            monkeypatch.setattr(route, "native_lora", lambda rows: None)
        staged = decode_both(model, step, steps=3, routes=plan.routes)
    for (_, a), (_, b) in zip(inside, staged, strict=True):
        # staged: torch's attention (and for one adapter torch's two matmuls a module); inside: native attention
        # and the grouped kernel's sums (bit for bit add_into's where add_into is the kernel: test_add_into.py)
        assert within_tolerance(b, a) and torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_layers_native_loras_are_kept_while_its_routes_calls_are(make_adapter) -> None:
    _, step, plan = routed(["a", None, "b"], make_adapter)
    layers = step.native
    assert layers is not None
    x = torch.zeros(3, 1, 32)
    with torch.no_grad():
        first = layers.routes_of(1, 3, plan.routes, x)
        assert isinstance(first, NativeLoras) and layers.routes_of(1, 3, plan.routes, x) is first
        assert first.calls == tuple(plan.routes[n].native_lora(3) for n in layers.names[1][1:])
        compacted = plan.compact([(1, 2)], 2)  # row 2 ("b") moves into row 1: the routes regroup
        second = layers.routes_of(1, 2, compacted.routes, x[:2])
    assert isinstance(second, NativeLoras) and second is not first


def test_a_route_on_the_mlp_container_keeps_torchs_ops_for_that_layer(monkeypatch) -> None:
    model = prepared("llama", LinearKernel.TORCH)
    step = decode_step_for(model)
    assert step is not None
    assert not isinstance(attach_native_layers(model, step, mode=DecodeLayers.NATIVE, rows=(4,)), str)
    layers = step.native
    assert layers is not None
    x = torch.zeros(3, 1, 32)
    assert layers.routes_of(0, 3, {}, x) is True
    assert layers.routes_of(0, 3, {"model.layers.0.mlp": object()}, x) is None
    assert layers.routes_of(1, 3, {"model.layers.0.mlp": object()}, x) is True
    assert layers.routes_of(0, 65, {}, x) is None  # beyond the native kernel's rows


def test_weights_moved_after_start_are_read_where_they_are_now(monkeypatch) -> None:
    model = prepared("llama", LinearKernel.TORCH)
    step = decode_step_for(model)
    assert step is not None
    assert not isinstance(attach_native_layers(model, step, mode=DecodeLayers.NATIVE, rows=(4,)), str)
    assert_close(decode_both(model, step, steps=1))
    layers = step.native
    assert layers is not None
    before = layers.layers[0].pointers
    moved = move_to_huge_pages([model], min_bytes=1)  # every weight re-pointed, the old storages freed
    assert moved.storages > 0
    assert_close(decode_both(model, step, steps=2))
    assert layers.layers[0].pointers != before


def test_a_probe_outside_the_tolerance_keeps_torchs_ops(monkeypatch, caplog) -> None:
    model = prepared("llama")
    step = decode_step_for(model)
    assert step is not None
    monkeypatch.setattr(native_layer_choice, "within_tolerance", lambda forward, got: False)
    with caplog.at_level(logging.INFO, logger=native_layer_choice.__name__):
        why = attach_native_layers(model, step, mode=DecodeLayers.NATIVE, rows=(4,))
    assert isinstance(why, str) and "logits differ" in why
    assert step.native is None
    assert "decode layers run torch's ops" in caplog.text


def test_a_probe_that_raises_keeps_torchs_ops(monkeypatch) -> None:
    model = prepared("llama")
    step = decode_step_for(model)
    assert step is not None

    def broken(self, *args):
        raise ValueError("rotary cos/sin (3, 1, 1, 4) do not give each row head_dim values")

    monkeypatch.setattr(NativeDecodeLayers, "attention_inputs", broken)
    why = attach_native_layers(model, step, mode=DecodeLayers.NATIVE, rows=(4,))
    assert why == "ValueError: rotary cos/sin (3, 1, 1, 4) do not give each row head_dim values"
    assert step.native is None


def test_the_tolerance_bounds_the_difference_and_keeps_the_argmax() -> None:
    logits = torch.tensor([[10.0, 1.0, -3.0], [0.5, 0.4995, 0.0]])
    assert within_tolerance(logits, logits + 1e-4)  # the bound: 1e-4 of the largest magnitude, 10
    assert not within_tolerance(logits, logits + 2e-3)
    swapped = logits.clone()
    swapped[1, :2] = torch.tensor([0.4995, 0.5])  # within the bound, but the greedy token changes
    assert not within_tolerance(logits, swapped)


def test_torch_mode_and_unsupported_models_say_why() -> None:
    model = prepared("llama")
    step = decode_step_for(model)
    assert step is not None
    assert attach_native_layers(model, step, mode=DecodeLayers.TORCH, rows=(1,)) == "--decode-layers torch"
    assert step.native is None
    gelu = build_base("llama")
    for layer in gelu.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert unsupported(gelu) == ["layer 0's MLP activation is not SiLU"]
    partial = build_base("llama")
    partial.config.partial_rotary_factor = 0.5
    assert unsupported(partial) == ["partial rotary embeddings"]
    half = build_base("llama").to(torch.bfloat16)
    assert unsupported(half) == ["layer 0 has weights that are not contiguous fp32 on the CPU"]


def test_auto_runs_them_only_at_the_row_counts_where_the_step_timed_faster(monkeypatch) -> None:
    model = prepared("llama")
    step = decode_step_for(model)
    assert step is not None
    timed = []

    def fake_time(model, step, rows):
        timed.append(rows)
        return StepTiming(rows=rows, native_s=1.0 if rows <= 4 else 3.0, torch_s=2.0)

    monkeypatch.setattr(native_layer_choice, "_time_step", fake_time)
    choice = attach_native_layers(model, step, mode=DecodeLayers.AUTO, rows=(1, 4, 16, 512))
    assert not isinstance(choice, str)
    assert timed == [1, 4, 16, 64]  # beyond the native kernel's 64 rows: timed at 64
    assert choice.table == ((1, True), (4, True), (16, False), (64, False))
    assert step.native is not None
    x = torch.zeros(1, 1, 32)
    assert [step.native.routes_of(0, n, {}, x) for n in (1, 3, 4, 5, 64, 65)] == [True, True, True, None, None, None]
    assert "1 rows 2.00x" in choice.describe()


def test_auto_times_real_steps() -> None:
    model = prepared("llama")
    step = decode_step_for(model)
    assert step is not None
    choice = attach_native_layers(model, step, mode=DecodeLayers.AUTO, rows=(1, 4))
    assert not isinstance(choice, str), choice
    assert [t.rows for t in choice.timings] == [1, 4]
    assert all(t.native_s > 0 and t.torch_s > 0 for t in choice.timings)
    assert choice.table == tuple((t.rows, t.native_faster) for t in choice.timings)


def test_the_engine_config_gives_way_to_a_fixed_linear_kernel() -> None:
    assert EngineConfig().decode_layer_options()["layers"] is DecodeLayers.AUTO
    assert EngineConfig(linear_kernel=LinearKernel.TORCH).decode_layer_options()["layers"] is DecodeLayers.TORCH
    fixed = EngineConfig(linear_kernel=LinearKernel.ONEDNN, decode_layers=DecodeLayers.NATIVE)
    assert fixed.decode_layer_options()["layers"] is DecodeLayers.NATIVE  # asked for by name
    assert EngineConfig(max_batch_rows=8).decode_layer_options()["rows"] == (1, 4, 8)
    with pytest.raises(ValueError, match="decode_layers must be a DecodeLayers"):
        EngineConfig(decode_layers="native")  # type: ignore[arg-type]


def test_the_decoder_without_a_lean_step_has_no_native_layers() -> None:
    decoder = Decoder(prepared("llama"), lean=False, layers=DecodeLayers.NATIVE)
    assert decoder.step is None and decoder.native_choice == "no lean decode step"
