"""When adapters leave: least recently used first, never a pinned one, the default, or one in use.

Pure functions over the resident adapters; the manager applies what they choose under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from loramux.core.adapters.adapter import EvictionCause, LoadedAdapter


def evictable(adapters: Iterable[LoadedAdapter], *, default: str | None) -> list[LoadedAdapter]:
    """Adapters that may leave now, least recently used first: unpinned, not the default, no users."""
    free = [a for a in adapters if not a.registration.pinned and a.name != default and a.users == 0]
    return sorted(free, key=_recency)


def choose_victims(
    candidates: Sequence[LoadedAdapter], *, excess_count: int, excess_bytes: int
) -> list[tuple[LoadedAdapter, EvictionCause]] | None:
    """The fewest of ``candidates`` (in their order) whose leaving removes ``excess_count`` adapters and
    ``excess_bytes`` bytes, each with the budget it was evicted for; None when all of them are not enough."""
    chosen: list[tuple[LoadedAdapter, EvictionCause]] = []
    for adapter in candidates:
        if excess_count <= 0 and excess_bytes <= 0:
            break
        cause = EvictionCause.MAX_ADAPTERS if excess_count > 0 else EvictionCause.MAX_ADAPTER_MEMORY
        chosen.append((adapter, cause))
        excess_count -= 1
        excess_bytes -= adapter.nbytes
    return chosen if excess_count <= 0 and excess_bytes <= 0 else None


def drain_candidate(adapters: Iterable[LoadedAdapter], *, default: str | None) -> LoadedAdapter | None:
    """When every evictable adapter is in use: the one to stop taking new rows, so that it leaves once its
    running rows finish and a waiting load gets its room (least recently used, unpinned, not the default)."""
    busy = [a for a in adapters if not a.registration.pinned and a.name != default and a.users > 0 and not a.draining]
    return min(busy, key=_recency, default=None)


def _recency(adapter: LoadedAdapter) -> tuple[float, float]:
    reg = adapter.registration
    return (reg.last_used or reg.loaded_at, reg.loaded_at)
