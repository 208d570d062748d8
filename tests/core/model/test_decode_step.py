"""loramux's Llama decode step: the forward's logits bit for bit (padding, ragged runs, fused GEMMs, LoRA routes),
and the forward kept for everything it does not cover."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable

import pytest
import torch

from loramux.core import AdapterManager
from loramux.core.lora.grouped import GroupedLinear
from loramux.core.lora.native_kernel import load_grouped_kernel
from loramux.core.lora.routing import UniformLinear, build_plan, use_plan
from loramux.core.lora.workspace import RoutingWorkspace
from loramux.core.model.decode_step import decode_step_for
from loramux.core.model.fused_linears import FusedSiblings, fused_groups
from loramux.core.model.kernel_choice import start_linear_kernels
from loramux.core.model.kv_batch import next_positions, prefill_positions
from loramux.core.model.kv_cache import GrowableCache
from loramux.core.model.linear_kernels import LinearKernel, onednn_works
from loramux.core.model.native_linear import native_linear
from loramux.core.model.ragged_attention import SEGMENTS_KWARG, Segment, use_ragged_attention
from tests.conftest import build_base

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths: left padding


def prepared(arch: str, kernel: LinearKernel = LinearKernel.AUTO) -> torch.nn.Module:
    """A model as the engine runs it: kernels chosen (and q/k/v, gate/up fused where oneDNN runs), ragged SDPA."""
    model = build_base(arch)
    start_linear_kernels(model, kernel, max_batch_rows=4, prefill_rows=16)
    assert use_ragged_attention(model)
    return model


def every_other_step_ragged(step: int, lengths: list[int]) -> list[Segment] | None:
    """PROMPTS' ragged runs on odd steps: row 0 alone, rows 1-2 together."""
    return [(0, 1, lengths[0]), (1, 3, max(lengths[1:]))] if step % 2 else None


def decode_both(
    model,
    step,
    *,
    steps: int = 4,
    routes=None,
    prompts: list[list[int]] = PROMPTS,
    caches=None,
    segments: Callable[[int, list[int]], list[Segment] | None] = every_other_step_ragged,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(forward's, step's) logits (N, V) for each of ``steps`` greedy decode steps from left-padded prompts;
    the step feeds the forward's tokens, so both see the same inputs. caches: the forward's and the step's
    (two GrowableCaches unless given); segments(step, lengths): that step's ragged runs (both get them)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    caches, pairs = caches or [GrowableCache(), GrowableCache()], []
    with torch.no_grad():
        for cache in caches:
            out = model(input_ids=ids, attention_mask=mask, position_ids=prefill_positions(mask), past_key_values=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            positions = next_positions(mask)
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            runs = segments(i, (positions[:, 0] + 1).tolist())
            extra = {SEGMENTS_KWARG: runs} if runs else {}
            forward = model(
                input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=caches[0], **extra
            )
            want = forward.logits[:, -1, :]
            got = step(token, positions=positions, mask=mask, cache=caches[1], segments=runs, routes=routes or {})
            pairs.append((want, got))
            token = want.argmax(-1, keepdim=True)
    return pairs


def assert_identical(pairs) -> None:
    for i, (want, got) in enumerate(pairs):
        assert torch.equal(want, got), f"step {i}: differs by {(want - got).abs().max().item():.3g}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kernel", [LinearKernel.AUTO, LinearKernel.TORCH, LinearKernel.NATIVE])
def test_the_step_gives_the_forwards_logits_bit_for_bit(arch, kernel) -> None:
    if kernel is LinearKernel.NATIVE and isinstance(why := native_linear(), str):
        pytest.skip(f"the native linear kernel cannot run here: {why}")
    model = prepared(arch, kernel)
    step = decode_step_for(model)
    assert step is not None
    assert_identical(decode_both(model, step))


@pytest.mark.skipif(not onednn_works(), reason="this torch build has no working oneDNN linear: nothing is fused")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_qkv_and_gate_up_run_as_views_of_one_gemm_with_the_same_logits(arch, monkeypatch) -> None:
    model = prepared(arch, LinearKernel.ONEDNN)
    groups = fused_groups(model)
    assert len(groups) == 2 * 2  # q/k/v and gate/up in each of 2 layers
    for group in groups:
        group.fused_rows = None  # one GEMM at every row count
    calls = []
    for group in groups:
        monkeypatch.setattr(group, "slices", lambda y, g=group: calls.append(g) or type(g).slices(g, y))
    step = decode_step_for(model)
    assert step is not None
    calls.clear()
    pairs = decode_both(model, step)
    assert_identical(pairs)
    # the forward hands the members copied slices (4 groups a forward: two prefills, then each decode step);
    # the step takes views of the GEMM's output and never cuts slices
    assert len(calls) == 4 * (2 + len(pairs))


@pytest.mark.parametrize(
    "targets",
    [  # routes on fused members (those groups call their modules), and routes beside unrouted fused groups
        (["q_proj", "v_proj", "down_proj"], ["k_proj", "gate_proj", "o_proj"]),
        (["o_proj", "down_proj"], ["o_proj"]),
    ],
    ids=["on-fused-members", "beside-fused-groups"],
)
def test_lora_routes_on_projections_run_inside_the_step(targets, make_adapter) -> None:
    model = prepared("llama", LinearKernel.ONEDNN if onednn_works() else LinearKernel.TORCH)
    manager = AdapterManager(model)
    for name, seed, modules in zip("ab", (1, 2), targets, strict=True):
        manager.load_adapter(str(make_adapter("llama", name, seed=seed, target_modules=modules)), name)
    for group in fused_groups(model):
        group.fused_rows = None  # one GEMM at every row count
    step = decode_step_for(model)
    assert step is not None
    base = decode_both(model, step, steps=2)
    with manager.routing(["a", None, "b"]) as plan:
        assert step.covers(plan.routes)
        routed = decode_both(model, step, steps=2, routes=plan.routes)
    assert_identical(routed)
    assert not torch.allclose(routed[0][0][0], base[0][0][0])  # row 0's adapter changed its logits
    assert torch.equal(routed[0][0][1], base[0][0][1])  # the base row did not move


def test_a_route_on_a_container_the_step_skips_needs_the_forward() -> None:
    model = prepared("llama")
    step = decode_step_for(model)
    assert step is not None
    assert step.covers(
        {"model.layers.0.self_attn.q_proj": object(), "lm_head": object(), "model.layers.1.mlp": object()}
    )
    assert not step.covers({"model.layers.1.self_attn": object()})
    assert not step.covers({"model.layers.0": object()})


def test_models_it_does_not_cover_keep_the_forward_and_say_why(caplog) -> None:
    caplog.set_level(logging.INFO, logger="loramux.core.model.decode_step")
    assert decode_step_for(build_base("gpt2")) is None
    assert "not a decoder-only model with .model and .lm_head" in caplog.text
    caplog.clear()
    eager = build_base("llama")
    eager.set_attn_implementation("eager")
    assert decode_step_for(eager) is None
    assert "attention 'eager'" in caplog.text
    caplog.clear()
    windowed = build_base("qwen2")
    windowed.config.sliding_window, windowed.config.use_sliding_window = 16, True
    windowed.config.layer_types = ["sliding_attention"] * 2
    assert decode_step_for(windowed) is None
    assert "sliding-window attention" in caplog.text and "not full attention" in caplog.text  # every reason


def test_a_step_that_would_differ_from_the_forward_is_refused(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="loramux.core.model.decode_step")
    model = prepared("llama")
    import loramux.core.model.decode_step as module

    monkeypatch.setattr(
        module, "_rotate_half", lambda x: torch.cat((x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)
    )
    assert decode_step_for(copy.deepcopy(model)) is None
    assert "logits differ from the forward's" in caplog.text


@pytest.mark.parametrize(
    "rows",
    [["a", "a", "a"], ["a", None, "a"], ["a", None, "b"]],
    ids=["uniform", "grouped", "distinct"],
)
def test_routes_that_add_into_columns_keep_the_fused_gemms(rows, make_adapter, monkeypatch) -> None:
    """A decode plan with the native kernel: every route on q/k/v and gate/up adds into its columns of the one
    GEMM's output (no member's own call, no copied slices), and the logits stay the forward's bit for bit."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) to build the grouped LoRA kernel")
    model = prepared("llama", LinearKernel.ONEDNN if onednn_works() else LinearKernel.TORCH)
    groups = fused_groups(model)
    if not groups:
        pytest.skip("no fused sibling groups on this machine's linear kernel")
    manager = AdapterManager(model)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, seed in (("a", 1), ("b", 2)):
        manager.load_adapter(str(make_adapter("llama", name, seed=seed, target_modules=every)), name)
    for group in groups:
        group.fused_rows = None  # one GEMM at every row count
    step = decode_step_for(model)
    assert step is not None
    workspace = RoutingWorkspace(rows=len(rows), grouped_kernel=load_grouped_kernel())
    plan = build_plan([manager.acquire(r).weights if r else None for r in rows], workspace=workspace)
    kinds = {type(route) for route in plan.routes.values()}
    assert kinds <= {UniformLinear, GroupedLinear} and all(getattr(r, "native", True) for r in plan.routes.values())
    inside: list[bool] = []  # set while the step runs
    member_calls: list[int] = []
    real = FusedSiblings.slices
    monkeypatch.setattr(FusedSiblings, "slices", lambda self, y: (member_calls.extend(inside[:1]), real(self, y))[1])

    def counted(*args, **kwargs):
        inside.append(True)
        try:
            return step(*args, **kwargs)
        finally:
            inside.pop()

    base = decode_both(model, step, steps=2)
    with use_plan(plan):
        routed = decode_both(model, counted, steps=2, routes=plan.routes)
    assert member_calls == [], "a routed fused group ran its members' own calls in the step"
    assert_identical(routed)
    assert not torch.allclose(routed[0][0][0], base[0][0][0])  # row 0's adapter changed its logits
