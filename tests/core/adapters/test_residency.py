"""Where adapters live and when they leave, on plain objects: the budgets, users, retired copies, draining."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loramux.core.adapters.adapter import EvictionCause, LoadedAdapter
from loramux.core.adapters.residency import Residency
from loramux.core.errors import InvalidArgumentError


def adapter(name: str, nbytes: int, *, last_used: float, pinned: bool = False, users: int = 0) -> LoadedAdapter:
    """A LoadedAdapter with only what residency reads: name, bytes, registration recency and pin."""
    reg = SimpleNamespace(name=name, pinned=pinned, last_used=last_used, loaded_at=0.0)
    fake = LoadedAdapter.__new__(LoadedAdapter)
    fake.registration, fake.users, fake.draining = reg, users, False  # type: ignore[assignment]
    fake.weights = SimpleNamespace(nbytes=nbytes)  # type: ignore[assignment]
    return fake


def resident(*adapters: LoadedAdapter, max_adapters: int = 8, max_bytes: int | None = None) -> Residency:
    r = Residency(max_adapters=max_adapters, max_bytes=max_bytes)
    for a in adapters:
        r.add(a)
    return r


def victims(r: Residency, size: int, **kwargs) -> list[tuple[str, EvictionCause]] | None:
    found = r.victims_for(size, default=kwargs.pop("default", None), **kwargs)
    return None if found is None else [(a.name, cause) for a, cause in found]


def test_room_without_eviction():
    r = resident(adapter("a", 10, last_used=1), max_adapters=2, max_bytes=100)
    assert victims(r, 50) == []


def test_the_count_budget_evicts_the_least_recently_used():
    r = resident(adapter("a", 10, last_used=2), adapter("b", 10, last_used=1), max_adapters=2)
    assert victims(r, 10) == [("b", EvictionCause.MAX_ADAPTERS)]


def test_the_byte_budget_evicts_as_many_as_needed():
    r = resident(
        adapter("a", 40, last_used=3), adapter("b", 40, last_used=1), adapter("c", 40, last_used=2), max_bytes=130
    )
    assert victims(r, 90) == [("b", EvictionCause.MAX_ADAPTER_MEMORY), ("c", EvictionCause.MAX_ADAPTER_MEMORY)]


def test_in_use_pinned_and_default_adapters_never_leave():
    r = resident(
        adapter("used", 10, last_used=0, users=1),
        adapter("pinned", 10, last_used=0, pinned=True),
        adapter("default", 10, last_used=0),
        adapter("free", 10, last_used=9),
        max_adapters=4,
    )
    assert victims(r, 10, default="default") == [("free", EvictionCause.MAX_ADAPTERS)]
    r.add(adapter("new", 10, last_used=10, users=1))
    r.current.pop("free")
    assert victims(r, 10, default="default") is None  # all in use, pinned or the default: wait (or refuse)


def test_never_fits_names_the_budget_beside_the_adapters_that_stay():
    pinned, other = adapter("p", 60, last_used=0, pinned=True), adapter("x", 30, last_used=0)
    r = resident(pinned, other, max_adapters=2, max_bytes=100)
    assert r.never_fits(30, default=None, name="y") is None  # x can leave
    assert r.never_fits(50, default=None, name="y") is EvictionCause.MAX_ADAPTER_MEMORY
    assert r.never_fits(10, default="x", name="y") is EvictionCause.MAX_ADAPTERS
    assert r.never_fits(10, default="x", name="x") is None  # the default itself, coming back


def test_a_replaced_copy_in_use_is_retired_and_its_bytes_still_count_until_released():
    old = adapter("a", 40, last_used=0, users=1)
    r = resident(old, max_bytes=100)
    assert victims(r, 40, replacing="a") == []
    assert r.remove("a") is old and r.held_bytes == 40  # retired: a row still runs with it
    r.add(adapter("a", 40, last_used=1, users=1))
    assert r.held_bytes == 80
    assert victims(r, 40) is None  # 120 > 100, and both copies are in use
    r.release(old)
    assert r.held_bytes == 40 and victims(r, 40) == []


def test_an_unused_replaced_copy_frees_its_room_at_once():
    r = resident(adapter("a", 60, last_used=0), max_bytes=100)
    assert victims(r, 60, replacing="a") == []
    r.remove("a")
    assert r.held_bytes == 0


def test_release_more_than_leased_is_a_bug():
    a = adapter("a", 1, last_used=0)
    r = resident(a)
    r.lease(a)
    r.release(a)
    with pytest.raises(RuntimeError):
        r.release(a)


def test_draining_marks_the_least_recently_used_busy_adapter_once():
    r = resident(adapter("old", 10, last_used=1, users=2), adapter("new", 10, last_used=5, users=1), max_adapters=2)
    first = r.drain_one(default=None)
    assert first is not None and first.name == "old" and first.draining
    second = r.drain_one(default=None)
    assert second is not None and second.name == "new"
    assert r.drain_one(default=None) is None
    r.stop_draining()
    assert not any(a.draining for a in r)


@pytest.mark.parametrize("kwargs", [{"max_adapters": 0}, {"max_adapters": 1, "max_bytes": 0}])
def test_budgets_must_be_positive(kwargs):
    with pytest.raises(InvalidArgumentError):
        Residency(**kwargs)
