"""When adapters leave: least-recently-used first, never a pinned one or the default."""

from __future__ import annotations

from collections.abc import Iterable

from loramux.core.adapters.adapter import LoadedAdapter


def choose_victim(adapters: Iterable[LoadedAdapter], *, default: str | None) -> LoadedAdapter | None:
    candidates = [a for a in adapters if not a.pinned and a.name != default]
    if not candidates:
        return None
    return min(candidates, key=lambda a: (a.last_used or a.loaded_at, a.loaded_at))
