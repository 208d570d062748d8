"""Routing-plan bookkeeping: swap_remove, and a compacted plan routing exactly like a freshly built one."""

from __future__ import annotations

import pytest
import torch

from core.adapter_manager import AdapterManager
from core.routing import swap_remove, use_plan
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
