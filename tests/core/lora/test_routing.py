"""Routing-plan bookkeeping: swap_remove, and a compacted plan routing exactly like a freshly built one."""

from __future__ import annotations

import pytest
import torch

from loramux.core import AdapterManager
from loramux.core.lora.routing import swap_remove, use_plan
from tests.conftest import input_ids, sfx


@pytest.mark.parametrize(
    ("n", "removed", "order", "moves"),
    [
        (1, {0}, [], []),
        (3, set(), [0, 1, 2], []),
        (4, {3}, [0, 1, 2], []),  # the last row leaves: nothing moves
        (4, {0}, [3, 1, 2], [(0, 3)]),
        (5, {1, 3}, [0, 4, 2], [(1, 4)]),  # row 3 was in the tail and leaves too
        (6, {0, 1}, [4, 5, 2, 3], [(0, 4), (1, 5)]),
        (6, {4, 5}, [0, 1, 2, 3], []),
        (5, {0, 1, 2, 3, 4}, [], []),
    ],
)
def test_swap_remove(n, removed, order, moves):
    assert swap_remove(n, removed) == (order, moves)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compacted_plan_routes_like_a_fresh_plan(arch, fresh_model, make_adapter):
    """Gathered LoRA rows, an embedding LoRA, a modules_to_save copy and base rows, then rows leave."""
    model = fresh_model(arch)
    manager = AdapterManager(model)
    embed = "embed_tokens" if arch == "llama" else "wte"
    specs = {
        "one": {"target_modules": [sfx(arch, "qkv"), sfx(arch, "down")]},
        "two": {"target_modules": [sfx(arch, "qkv"), embed], "r": 8},
        "three": {"target_modules": [sfx(arch, "down")], "modules_to_save": ["lm_head"]},
    }
    for i, (name, kwargs) in enumerate(specs.items()):
        manager.load_adapter(str(make_adapter(arch, name, seed=3000 + i, **kwargs)), name)
    rows = ["one", "two", None, "three", "two", "one", "three"]
    held = [manager.acquire(r) if r is not None else None for r in rows]
    ids = input_ids(len(rows), seed=9)
    order, moves = swap_remove(len(rows), {0, 3, 4})
    compacted = manager.plan(held).compact(moves, len(order))
    fresh = manager.plan([held[i] for i in order])
    with torch.no_grad():
        with use_plan(compacted):
            got = model(input_ids=ids[order]).logits
        with use_plan(fresh):
            expected = model(input_ids=ids[order]).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def mixed_adapter_weights(model, arch: str, make_adapter, *, seed: int, extra: dict | None = None) -> dict:
    """Adapters whose routes differ (rank 4 with and without a LoRA bias, rank 16 with an embedding LoRA, and
    ``extra``) loaded into ``model``: name -> weights, and None -> None (a base row)."""
    manager = AdapterManager(model)
    specs = {
        "small": {"target_modules": [sfx(arch, "qkv"), sfx(arch, "down")], "r": 4},
        "other": {"target_modules": [sfx(arch, "qkv")], "r": 4, "lora_bias": True},
        "big": {"target_modules": [sfx(arch, "qkv"), "embed_tokens"], "r": 16},
        **(extra or {}),
    }
    for i, (name, kwargs) in enumerate(specs.items()):
        manager.load_adapter(str(make_adapter(arch, name, seed=seed + i, **kwargs)), name)
    return {name: manager.acquire(name).weights for name in specs} | {None: None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_extended_and_compacted_plans_route_like_fresh_plans(arch, fresh_model, make_adapter):
    """Rows join (in place where the route allows, rebuilt where not: a uniform route turning mixed, a larger
    rank, embeddings) and leave, in turns, as the engine does; after each change the plan routes exactly like
    one built from scratch for the same rows."""
    from loramux.core.lora.routing import build_plan, extend_plan

    model = fresh_model(arch)
    weights = mixed_adapter_weights(model, arch, make_adapter, seed=3100)
    ids = input_ids(12, seed=11)
    rows: list[str | None] = ["small", "small"]  # uniform to start with
    plan = build_plan([weights[r] for r in rows])
    steps = [("join", [None, "small"]), ("join", ["other"]), ("leave", {0}), ("join", ["big", "other", None])]
    steps += [("leave", {1, 4}), ("join", ["small"] * 4)]
    for kind, change in steps:
        if kind == "join":
            plan = extend_plan(plan, [weights[r] for r in rows], [weights[r] for r in change])
            rows = rows + list(change)
        else:
            order, moves = swap_remove(len(rows), set(change))
            plan = plan.compact(moves, len(order))
            rows = [rows[i] for i in order]
        fresh = build_plan([weights[r] for r in rows])
        batch = ids[: len(rows)]
        with torch.no_grad():
            with use_plan(plan):
                got = model(input_ids=batch).logits
            with use_plan(fresh):
                expected = model(input_ids=batch).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=f"after {kind} {change}")
