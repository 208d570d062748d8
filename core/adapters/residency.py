"""Where adapters live: the resident weights of each registered name, the budgets they share, and their users.

Two budgets bound the resident adapters: a count (``max_adapters``) and bytes (``max_bytes``, None for no
limit). Bytes count every copy still in memory: the current one of each name and *retired* ones, the weights
of an unloaded or replaced adapter that rows still run with (freed when the last of them lets go). Plain
bookkeeping, no torch and no locking: the manager calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Iterator

from loramux.core.adapters.adapter import EvictionCause, LoadedAdapter
from loramux.core.adapters.eviction import choose_victims, drain_candidate, evictable
from loramux.core.errors import InvalidArgumentError


class Residency:
    def __init__(self, *, max_adapters: int, max_bytes: int | None = None) -> None:
        if max_adapters < 1:
            raise InvalidArgumentError(f"max_adapters must be >= 1 (got {max_adapters})", field="max_adapters")
        if max_bytes is not None and max_bytes < 1:
            raise InvalidArgumentError(f"max_adapter_bytes must be >= 1 (got {max_bytes})", field="max_adapter_bytes")
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self.current: dict[str, LoadedAdapter] = {}
        self._retired: list[LoadedAdapter] = []

    def __iter__(self) -> Iterator[LoadedAdapter]:
        return iter(list(self.current.values()))

    @property
    def held_bytes(self) -> int:
        """Bytes of every adapter copy in memory, retired ones included."""
        return sum(a.nbytes for a in self.current.values()) + sum(a.nbytes for a in self._retired)

    # -- users ----------------------------------------------------------------------------------------

    @staticmethod
    def lease(adapter: LoadedAdapter, count: int = 1) -> None:
        adapter.users += count

    def release(self, adapter: LoadedAdapter) -> None:
        if adapter.users < 1:
            raise RuntimeError(f"adapter {adapter.name!r} released more often than leased")
        adapter.users -= 1
        if adapter.users == 0 and adapter in self._retired:
            self._retired.remove(adapter)

    # -- membership -----------------------------------------------------------------------------------

    def add(self, adapter: LoadedAdapter) -> None:
        if adapter.name in self.current:
            raise RuntimeError(f"adapter {adapter.name!r} is already resident")
        self.current[adapter.name] = adapter

    def add_retired(self, adapter: LoadedAdapter) -> None:
        """Weights that are not their name's current ones (a stale load) but that rows will run with."""
        if adapter.users > 0:
            self._retired.append(adapter)

    def remove(self, name: str) -> LoadedAdapter | None:
        """Take a name's weights out of the resident set; rows still using them keep them (retired)."""
        adapter = self.current.pop(name, None)
        if adapter is not None:
            self.add_retired(adapter)
        return adapter

    # -- room -----------------------------------------------------------------------------------------

    def victims_for(
        self, size: int, *, default: str | None, replacing: str | None = None
    ) -> list[tuple[LoadedAdapter, EvictionCause]] | None:
        """Which adapters must leave (and why) before one of ``size`` bytes becomes resident (in place of
        ``replacing``'s current copy, when given); None when that is not possible now."""
        leaving = self.current.get(replacing) if replacing is not None else None
        count = len(self.current) + 1 - (leaving is not None)
        held = self.held_bytes + size - (leaving.nbytes if leaving is not None and leaving.users == 0 else 0)
        limit = self.max_bytes if self.max_bytes is not None else held
        candidates = [a for a in evictable(self.current.values(), default=default) if a is not leaving]
        return choose_victims(candidates, excess_count=count - self.max_adapters, excess_bytes=held - limit)

    def never_fits(self, size: int, *, default: str | None, name: str) -> EvictionCause | None:
        """The budget that ``name``'s adapter of ``size`` bytes can never fit in, beside the adapters that never
        leave (pinned ones and the default); None when waiting for rows to finish would make room."""
        staying = [a for a in self.current.values() if a.name != name and (a.registration.pinned or a.name == default)]
        if len(staying) + 1 > self.max_adapters:
            return EvictionCause.MAX_ADAPTERS
        if self.max_bytes is not None and sum(a.nbytes for a in staying) + size > self.max_bytes:
            return EvictionCause.MAX_ADAPTER_MEMORY
        return None

    def drain_one(self, *, default: str | None) -> LoadedAdapter | None:
        """Mark the adapter that should leave next once its rows finish (see eviction.drain_candidate)."""
        candidate = drain_candidate(self.current.values(), default=default)
        if candidate is not None:
            candidate.draining = True
        return candidate

    def stop_draining(self) -> None:
        for adapter in self.current.values():
            adapter.draining = False
