"""The manager's shared state: the registrations, the resident set, the loads under way, the default, and the
one lock that guards them all, with the few operations both the lifecycle (manager.py) and the requests
(claims.py) make on it. Every method here expects the lock held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from torch import nn

from loramux.core.adapters.adapter import (
    AdapterEvent,
    AdapterEventKind,
    AdapterInfo,
    AdapterState,
    EvictionCause,
    LoadedAdapter,
    Registration,
    adapter_info,
)
from loramux.core.adapters.builder import AdapterBuilder
from loramux.core.adapters.jobs import LoadJob
from loramux.core.adapters.residency import Residency
from loramux.core.errors import AdapterNotFoundError, CapacityExceededError
from loramux.core.lora.layers import wrap_modules

log = logging.getLogger("loramux.core.adapters.manager")


class AdapterTable:
    def __init__(self, model: nn.Module, residency: Residency) -> None:
        self.model, self.residency = model, residency
        self.builder = AdapterBuilder(model)
        self.registry: dict[str, Registration] = {}
        self.jobs: dict[tuple[str, Registration | None], LoadJob] = {}
        self.default: str | None = None
        self.lock = threading.RLock()
        self.room = threading.Condition(self.lock)  # notified whenever an adapter may have become evictable
        self.observer: Callable[[AdapterEvent], None] | None = None

    def notify(self, event: AdapterEvent) -> None:
        observer = self.observer
        if observer is None:
            return
        try:
            observer(event)
        except Exception:
            log.exception("adapter observer failed on %s", event)

    def get(self, name: str) -> Registration:
        reg = self.registry.get(name)
        if reg is None:
            raise self.not_found(name)
        return reg

    def not_found(self, name: str) -> AdapterNotFoundError:
        known = sorted(self.registry)
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        return AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {shown or 'none'})", field="adapter")

    def info(self, reg: Registration) -> AdapterInfo:
        if self.residency.current.get(reg.name) is not None:
            state = AdapterState.RESIDENT
        elif (reg.name, reg) in self.jobs:
            state = AdapterState.LOADING
        else:
            state = AdapterState.NOT_RESIDENT
        return adapter_info(reg, state=state, is_default=reg.name == self.default)

    def make_room(self, adapter: LoadedAdapter, *, replacing: bool = False, refuse_busy: bool = False) -> bool:
        """Evict what must go for ``adapter`` to be resident. False, with nothing evicted, when the adapters in
        the way are in use; CapacityExceededError when it can never fit (or, with refuse_busy, cannot now)."""
        residency = self.residency
        replaced = adapter.name if replacing else None
        victims = residency.victims_for(adapter.nbytes, default=self.default, replacing=replaced)
        if victims is None:
            cause = residency.never_fits(adapter.nbytes, default=self.default, name=adapter.name)
            if cause is not None or refuse_busy:
                raise no_room(cause or EvictionCause.MAX_ADAPTERS, residency, busy=cause is None)
            return False
        for victim, cause in victims:
            residency.remove(victim.name)
            self.notify(AdapterEvent(AdapterEventKind.EVICT, victim.name, victim.nbytes, cause=cause))
        return True

    def make_resident(self, adapter: LoadedAdapter, *, users: int = 0) -> None:
        wrap_modules(self.model, adapter.weights.module_names, self.builder.modules)
        adapter.registration.loaded_at = time.time()
        self.residency.add(adapter)
        self.residency.lease(adapter, users)


def no_room(cause: EvictionCause, residency: Residency, *, busy: bool) -> CapacityExceededError:
    """RESOURCE_EXHAUSTED for an adapter the budget has no room for (``busy``: now; otherwise: ever)."""
    if cause is EvictionCause.MAX_ADAPTER_MEMORY:
        what, field = f"{residency.max_bytes} bytes of resident adapters", "max_adapter_memory"
    else:
        what, field = f"{residency.max_adapters} resident adapters", "max_adapters"
    why = "are in use; retry when requests finish" if busy else "leave no room beside the pinned and default ones"
    return CapacityExceededError(f"{what} {why}", field=field)
