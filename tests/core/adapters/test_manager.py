"""The adapter manager's state machine: load, idempotent reload, replace, default, unload, list, capacity and
LRU eviction, pinning, held adapters, and routing blocks that always leave the model bare."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramux.core import AdapterManager
from loramux.core.adapters.adapter import AdapterState
from loramux.core.adapters.sources import SourceKind
from loramux.core.errors import (
    AdapterAlreadyExistsError,
    AdapterNotFoundError,
    CapacityExceededError,
    InvalidArgumentError,
    LoramuxError,
)
from loramux.core.lora.routing import current_plan
from tests.conftest import bare_logits, input_ids, routed_logits

ARCH = "llama"


@pytest.fixture
def setup(fresh_model, make_adapter):
    """A Llama copy, its manager, and three distinct adapters (seeds differ, ranks differ)."""
    model = fresh_model(ARCH)
    paths = {
        "a": make_adapter(ARCH, "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(
            ARCH,
            "b",
            seed=2,
            r=8,
            lora_alpha=16,
            rank_pattern={"down_proj": 12},
            target_modules=["down_proj", "o_proj"],
        ),
        "c": make_adapter(ARCH, "c", seed=3, r=2, target_modules=["up_proj"], modules_to_save=["lm_head"]),
    }
    return model, paths


def resident(manager: AdapterManager) -> list[str]:
    return [i.name for i in manager.list_adapters(state=AdapterState.RESIDENT)]


def _snapshot(manager: AdapterManager):
    return [(i.name, i.source, i.version, i.is_default, i.pinned, i.loaded_at) for i in manager.list_adapters()]


def _file_nbytes(folder: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(folder / "adapter_model.safetensors")).values())


def test_load_does_not_make_default(setup):
    model, paths = setup
    manager = AdapterManager(model)
    result = manager.load_adapter(str(paths["a"]), "a")
    assert result.already_loaded is False
    assert result.info.name == "a" and result.info.version == 1
    assert result.info.is_default is False
    assert manager.default_adapter is None
    ids = input_ids(2)
    assert not torch.allclose(routed_logits(model, manager, ids, ["a", "a"]), bare_logits(model, ids), atol=1e-4)


def test_list_contents(setup):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["b"]), "b", pinned=True)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["c"]), "c")
    manager.set_adapter("a")
    infos = {i.name: i for i in manager.list_adapters()}
    assert [i.name for i in manager.list_adapters()] == ["a", "b", "c"]

    a, b, c = infos["a"], infos["b"], infos["c"]
    assert a.source == str(paths["a"]) and a.source_kind is SourceKind.LOCAL and a.subfolder is None
    assert (a.max_rank, a.lora_alpha) == (4, 8)
    assert (b.max_rank, b.lora_alpha) == (12, 16)  # the largest per-module rank (rank_pattern)
    assert a.target_modules == ("q_proj", "v_proj")
    assert b.target_modules == ("down_proj", "o_proj")
    assert a.num_modules == 4 and b.num_modules == 4
    assert "up_proj" in c.target_modules
    for info, name in ((a, "a"), (b, "b"), (c, "c")):
        assert info.size_bytes > 0
        assert info.size_bytes == _file_nbytes(paths[name]), name  # fp32 file, fp32 base: same bytes
        assert info.dtype == "float32"
        assert info.trainable is False
        assert info.version == 1
    assert (a.is_default, b.is_default, c.is_default) == (True, False, False)
    assert (a.pinned, b.pinned, c.pinned) == (False, True, False)
    assert manager.get_adapter("b") == b


def test_idempotent_reload_changes_nothing(setup):
    model, paths = setup
    manager = AdapterManager(model)
    first = manager.load_adapter(str(paths["a"]), "a")
    ids = input_ids(3)
    before = routed_logits(model, manager, ids, ["a", None, "a"])
    state = _snapshot(manager)
    again = manager.load_adapter(str(paths["a"]), "a")
    assert again.already_loaded is True
    assert again.info.version == first.info.version == 1
    assert again.info.loaded_at == first.info.loaded_at
    assert _snapshot(manager) == state
    assert torch.equal(routed_logits(model, manager, ids, ["a", None, "a"]), before)


def test_same_name_other_source_conflicts_unless_replace(setup):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["a"]), "x")
    manager.load_adapter(str(paths["b"]), "b")
    ids = input_ids(2)
    old_x = routed_logits(model, manager, ids, ["x", None])
    state = _snapshot(manager)

    with pytest.raises(AdapterAlreadyExistsError) as err:
        manager.load_adapter(str(paths["b"]), "x")
    assert err.value.reason == "ADAPTER_ALREADY_EXISTS"
    assert _snapshot(manager) == state
    assert torch.equal(routed_logits(model, manager, ids, ["x", None]), old_x)

    held_old = manager.acquire("x")
    result = manager.load_adapter(str(paths["b"]), "x", replace=True)
    assert result.already_loaded is False
    assert result.info.version == 2
    assert result.info.source == str(paths["b"])
    assert result.info.is_default == state[[s[0] for s in state].index("x")][3]
    new_x = routed_logits(model, manager, ids, ["x", None])
    assert not torch.allclose(new_x[0], old_x[0], atol=1e-4)
    # "x" now computes exactly what the adapter at paths["b"] computes.
    torch.testing.assert_close(new_x, routed_logits(model, manager, ids, ["b", None]), atol=1e-6, rtol=0)
    # A request that held the old "x" keeps running with the old weights.
    torch.testing.assert_close(routed_logits(model, manager, ids, [held_old, None]), old_x, atol=0, rtol=0)


def test_set_adapter_and_default(setup):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["b"]), "b")
    manager.set_adapter("b")
    assert manager.default_adapter == "b"
    assert manager.get_adapter("b").is_default and not manager.get_adapter("a").is_default
    with pytest.raises(AdapterNotFoundError) as err:
        manager.set_adapter("nope")
    assert err.value.reason == "ADAPTER_NOT_FOUND"
    assert manager.default_adapter == "b"
    manager.set_adapter(None)
    assert manager.default_adapter is None
    assert not any(i.is_default for i in manager.list_adapters())
    # The default is only a name for callers; the bare model stays bare.
    manager.set_adapter("a")
    ids = input_ids(2)
    assert torch.equal(bare_logits(model, ids), routed_logits(model, manager, ids, [None, None]))


def test_unload(setup, base_models):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["b"]), "b")
    manager.set_adapter("a")
    info = manager.unload_adapter("a")
    assert info.name == "a" and info.is_default
    assert manager.default_adapter is None
    assert [i.name for i in manager.list_adapters()] == ["b"]
    with pytest.raises(AdapterNotFoundError):
        manager.get_adapter("a")
    with pytest.raises(AdapterNotFoundError):
        manager.unload_adapter("a")
    with pytest.raises(AdapterNotFoundError):
        with manager.routing(["a"]):
            pass
    ids = input_ids(2)
    assert torch.equal(bare_logits(model, ids), bare_logits(base_models[ARCH], ids))
    # The name is free again, from any source.
    assert manager.load_adapter(str(paths["c"]), "a").already_loaded is False


def test_unload_non_default_keeps_default(setup):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["b"]), "b")
    manager.set_adapter("b")
    manager.unload_adapter("a")
    assert manager.default_adapter == "b"


def test_capacity_evicts_least_recently_used(setup):
    model, paths = setup
    manager = AdapterManager(model, max_adapters=2)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["b"]), "b")
    ids = input_ids(1)
    routed_logits(model, manager, ids, ["a"])  # "a" is now more recently used than "b"
    manager.load_adapter(str(paths["c"]), "c")
    assert resident(manager) == ["a", "c"]
    assert [i.name for i in manager.list_adapters()] == ["a", "b", "c"]  # evicted, still registered
    assert manager.get_adapter("b").state is AdapterState.NOT_RESIDENT
    # "c" was loaded after "a" was last used: "a" goes next, when "b" is used again (and loads again)
    before = manager.get_adapter("b")
    routed_logits(model, manager, ids, ["b"])
    assert resident(manager) == ["b", "c"]
    after = manager.get_adapter("b")
    assert after.version == before.version == 1 and after.state is AdapterState.RESIDENT


def test_capacity_never_evicts_pinned_or_default(setup):
    model, paths = setup
    manager = AdapterManager(model, max_adapters=2)
    manager.load_adapter(str(paths["a"]), "a")  # least recently used, but the default
    manager.load_adapter(str(paths["b"]), "b")
    manager.set_adapter("a")
    manager.load_adapter(str(paths["c"]), "c")
    assert resident(manager) == ["a", "c"]

    manager.set_pinned("c", True)
    assert manager.get_adapter("c").pinned
    state = _snapshot(manager)
    with pytest.raises(CapacityExceededError) as err:
        manager.acquire("b")  # "b" can never be resident beside the default and a pinned one
    assert err.value.reason == "RESOURCE_EXHAUSTED" and err.value.field == "max_adapters"
    assert _snapshot(manager) == state

    manager.set_pinned("c", False)
    manager.acquire("b")
    assert resident(manager) == ["a", "b"]


def test_capacity_exceeded_when_all_pinned(setup):
    model, paths = setup
    manager = AdapterManager(model, max_adapters=2)
    manager.load_adapter(str(paths["a"]), "a", pinned=True)
    manager.load_adapter(str(paths["b"]), "b", pinned=True)
    ids = input_ids(3)
    before = routed_logits(model, manager, ids, ["a", "b", None])
    state = _snapshot(manager)
    with pytest.raises(CapacityExceededError):
        manager.load_adapter(str(paths["c"]), "c")
    assert _snapshot(manager) == state
    assert torch.equal(routed_logits(model, manager, ids, ["a", "b", None]), before)
    # Replacing an adapter in place needs no room.
    assert manager.load_adapter(str(paths["c"]), "b", replace=True).info.version == 2


def test_held_adapter_still_routes_after_unload(setup):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["c"]), "c")
    ids = input_ids(3)
    expected = routed_logits(model, manager, ids, ["a", None, "c"])
    held_a, held_c = manager.acquire("a"), manager.acquire("c")
    manager.unload_adapter("a")
    manager.unload_adapter("c")
    assert manager.list_adapters() == []
    torch.testing.assert_close(routed_logits(model, manager, ids, [held_a, None, held_c]), expected, atol=0, rtol=0)


def test_acquire_unknown_and_none(setup):
    model, _ = setup
    manager = AdapterManager(model)
    assert manager.acquire(None) is None
    with pytest.raises(AdapterNotFoundError):
        manager.acquire("ghost")


def test_routing_block_leaves_model_bare_even_if_forward_raises(setup, base_models):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["c"]), "c")
    ids = input_ids(3)
    bare = bare_logits(base_models[ARCH], ids)
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is the state afterwards
        with torch.no_grad(), manager.routing(["a", "c"]):  # plan for 2 rows, batch of 3
            model(input_ids=ids)
    assert current_plan() is None
    assert torch.equal(bare_logits(model, ids), bare)
    with pytest.raises(RuntimeError, match="boom"):
        with manager.routing(["a", "c", None]):
            raise RuntimeError("boom")
    assert current_plan() is None
    assert torch.equal(bare_logits(model, ids), bare)
    # And the manager still routes correctly afterwards.
    routed = routed_logits(model, manager, ids, ["a", "c", None])
    torch.testing.assert_close(routed[2], bare[2], atol=1e-6, rtol=0)
    assert not torch.allclose(routed[0], bare[0], atol=1e-4)


def test_model_is_bare_after_loads_and_unloads(setup, base_models):
    model, paths = setup
    manager = AdapterManager(model)
    ids = input_ids(2)
    bare = bare_logits(base_models[ARCH], ids)
    for name, path in paths.items():
        manager.load_adapter(str(path), name)
        assert torch.equal(bare_logits(model, ids), bare)
    for name in paths:
        manager.unload_adapter(name)
        assert torch.equal(bare_logits(model, ids), bare)


def test_held_adapter_survives_eviction(setup):
    model, paths = setup
    manager = AdapterManager(model, max_adapters=1)
    manager.load_adapter(str(paths["a"]), "a")
    ids = input_ids(2)
    expected = routed_logits(model, manager, ids, ["a", None])
    held = manager.acquire("a")
    manager.load_adapter(str(paths["b"]), "b")  # evicts "a"
    assert resident(manager) == ["b"]
    torch.testing.assert_close(routed_logits(model, manager, ids, [held, None]), expected, atol=0, rtol=0)


def test_unloading_makes_room(setup):
    model, paths = setup
    manager = AdapterManager(model, max_adapters=2)
    manager.load_adapter(str(paths["a"]), "a", pinned=True)
    manager.load_adapter(str(paths["b"]), "b", pinned=True)
    manager.unload_adapter("a")
    manager.load_adapter(str(paths["c"]), "c", pinned=True)  # no eviction needed, none possible
    assert [i.name for i in manager.list_adapters()] == ["b", "c"]


def test_set_pinned(setup):
    model, paths = setup
    manager = AdapterManager(model)
    manager.load_adapter(str(paths["a"]), "a")
    assert manager.set_pinned("a", True).pinned
    assert manager.get_adapter("a").pinned
    assert not manager.set_pinned("a", False).pinned
    with pytest.raises(AdapterNotFoundError):
        manager.set_pinned("ghost", True)


def test_failed_load_at_capacity_evicts_nothing(setup, tmp_path):
    model, paths = setup
    manager = AdapterManager(model, max_adapters=2)
    manager.load_adapter(str(paths["a"]), "a")
    manager.load_adapter(str(paths["b"]), "b")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((paths["c"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    state = _snapshot(manager)
    with pytest.raises(LoramuxError):
        manager.load_adapter(str(broken), "c")
    assert _snapshot(manager) == state


@pytest.mark.parametrize("kwargs", [{"max_adapters": 0}, {"max_rank": 0}])
def test_invalid_limits(fresh_model, kwargs):
    with pytest.raises(InvalidArgumentError):
        AdapterManager(fresh_model(ARCH), **kwargs)


def test_a_load_that_gives_up_waiting_for_room_leaves_nothing_draining(setup):
    """Budget 1, A in use: B's load waits for room and drains A (A takes no new requests). When B's only
    request gives up, A must take requests again: a drain left behind made A's next load wait for A's own
    eviction, which nothing would do (every stream on A stalled until its deadline; found by the soak)."""
    model, paths = setup
    manager = AdapterManager(model, max_adapters=1)
    manager.load_adapter(str(paths["b"]), "B")
    manager.load_adapter(str(paths["a"]), "A")  # B is evicted: registered, not resident
    running = manager.claim("A")  # a running request holds A
    assert running.adapter is not None and running.job is None
    waiting = manager.claim("B")
    job = waiting.job
    assert job is not None
    for _ in range(300):  # bounded: the loader thread reaches its wait for room
        if manager.waiting() == (0, 1):
            break
        job.done.wait(0.01)
    assert manager.waiting() == (0, 1) and running.adapter.draining
    manager.release(waiting)  # B's only request gives up
    assert job.done.wait(30), "the load did not end when its last waiter left"
    assert not running.adapter.draining
    again = manager.claim("A")  # a new request on A is served by the resident copy at once
    assert again.adapter is running.adapter and again.job is None
    manager.release(again)
    manager.release(running)
