"""The adapter manager: PEFT's load_adapter/set_adapter/delete_adapter, made safe for serving many adapters.

An adapter is *registered* (a name bound to its source: LoadAdapter, a preload, or a load on demand) until
it is unloaded, and *resident* while its weights are in memory (``residency``, within a count and a byte
budget). Requests *claim* an adapter: a resident one is leased at once (an adapter in use is never evicted);
any other is loaded off the caller's thread by one job that every request naming it waits on (``jobs``),
made resident when the budget has room, and leased to each of them. Eviction only drops weights: the next
request loads them again from the registration's source. Loading reads and builds everything before any
shared state changes (``builder``), so a failed load leaves no trace. Rows pick adapters through explicit
routing plans; the default adapter is just a name consulted by callers that name none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from loramux.core.adapters.adapter import (
    AdapterEvent,
    AdapterEventKind,
    AdapterInfo,
    AdapterState,
    LoadedAdapter,
    LoadResult,
    Registration,
)
from loramux.core.adapters.builder import ephemeral_device
from loramux.core.adapters.claims import Claim, Claims, ClaimStats
from loramux.core.adapters.loading import LoadOptions
from loramux.core.adapters.names import validate_adapter_name
from loramux.core.adapters.on_demand import OnDemand
from loramux.core.adapters.residency import Residency
from loramux.core.adapters.sources import DEFAULT_SOURCES, AdapterLocation, AdapterSource
from loramux.core.adapters.table import AdapterTable
from loramux.core.errors import AdapterAlreadyExistsError, CapacityExceededError, InvalidArgumentError
from loramux.core.lora.routing import RoutingPlan, build_plan, use_plan


class AdapterManager:
    """Many LoRA adapters over one base model, with per-row routing.

    max_adapters / max_adapter_bytes (None: no byte limit): the resident budgets; making room evicts the least
    recently used adapters that are neither pinned, the default, nor in use. max_rank: adapters with a larger
    per-module rank are refused. on_demand: where names nobody registered are looked for (None: such names are
    NOT_FOUND). observer: told of every load, reload, replace, unload and eviction (an AdapterEvent), on the
    thread that made the change, possibly with the manager's lock held: it must be quick and must not call
    back into the manager; its exceptions are logged, never raised.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_adapters: int = 64,
        max_adapter_bytes: int | None = None,
        max_rank: int = 256,
        sources: Sequence[AdapterSource] = DEFAULT_SOURCES,
        on_demand: OnDemand | None = None,
        observer: Callable[[AdapterEvent], None] | None = None,
    ) -> None:
        if max_rank < 1:
            raise InvalidArgumentError(f"max_rank must be >= 1 (got {max_rank})", field="max_rank")
        self.model, self.max_rank = model, max_rank
        self._t = AdapterTable(model, Residency(max_adapters=max_adapters, max_bytes=max_adapter_bytes))
        self._t.observer = observer
        self._sources = tuple(sources)
        self._claims = Claims(self._t, max_rank=max_rank, on_demand=on_demand)

    @property
    def observer(self) -> Callable[[AdapterEvent], None] | None:
        return self._t.observer

    @observer.setter
    def observer(self, observer: Callable[[AdapterEvent], None] | None) -> None:
        self._t.observer = observer

    # -- registering: LoadAdapter and preloads --------------------------------------------------------

    def load_adapter(
        self,
        model_id: str,
        adapter_name: str,
        *,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | None = None,
        replace: bool = False,
        pinned: bool = False,
        sources: Sequence[AdapterSource] | None = None,
    ) -> LoadResult:
        """Register and load a PEFT LoRA adapter from a folder or the Hub. It does not become the default.

        It is made resident when the budget has room (evicting adapters nobody uses); when every other resident
        adapter is in use it stays registered, not resident, and its first request loads it (a pinned one is
        refused instead). ``sources``: where it may come from, instead of the manager's own (a server passes
        restricted ones for loads its clients ask for; see sources.restricted_sources).

        low_cpu_mem_usage is accepted for PEFT compatibility: loramux always builds each tensor once, directly
        in its final dtype and device, with no randomly initialised copy. ephemeral_gpu_offload does the
        load-time dtype casts on CUDA when the base lives on the CPU; without CUDA it has no effect.
        """
        del low_cpu_mem_usage  # always the case, see above
        started, t = time.monotonic(), self._t
        validate_adapter_name(adapter_name)
        location = AdapterLocation(model_id, subfolder or None, revision or None, cache_dir, token)
        with t.lock:
            if (existing := self._check_free(adapter_name, location, replace=replace)) is not None:
                return self._result(existing, None, already_loaded=True)
        options = LoadOptions(
            read_device=torch.device(torch_device) if torch_device is not None else None,
            autocast_adapter_dtype=autocast_adapter_dtype,
            trainable=is_trainable,
            max_rank=self.max_rank,
            work_device=ephemeral_device(ephemeral_gpu_offload),
        )
        adapter = t.builder.build(location, adapter_name, options, sources=sources or self._sources, pinned=pinned)
        with t.lock:
            if (existing := self._check_free(adapter_name, location, replace=replace)) is not None:
                return self._result(existing, None, already_loaded=True)  # a concurrent load won the race
            previous = t.registry.get(adapter_name)
            if previous is not None:
                reg = adapter.registration
                reg.version, reg.requests, reg.last_used = previous.version + 1, previous.requests, previous.last_used
            adapter.version = adapter.registration.version
            resident = t.make_room(adapter, replacing=previous is not None, refuse_busy=pinned)
            if previous is not None:
                t.residency.remove(adapter_name)
            t.registry[adapter_name] = adapter.registration
            if resident:
                t.make_resident(adapter)
            result = self._result(adapter.registration, adapter, already_loaded=False)
        kind = AdapterEventKind.REPLACE if previous is not None else AdapterEventKind.LOAD
        t.notify(AdapterEvent(kind, adapter_name, adapter.nbytes, time.monotonic() - started))
        return result

    def _check_free(self, name: str, location: AdapterLocation, *, replace: bool) -> Registration | None:
        """The registration of an identical earlier load; None when the name is free (or may be replaced)."""
        existing = self._t.registry.get(name)
        if existing is not None and existing.location.identity() == location.identity():
            return existing
        if existing is not None and not replace:
            raise AdapterAlreadyExistsError(
                f"adapter {name!r} is already loaded from {existing.location.model_id!r}"
                f" (revision {existing.location.revision!r}); pass replace to swap it",
                field="name",
            )
        return None

    def _result(self, reg: Registration, adapter: LoadedAdapter | None, *, already_loaded: bool) -> LoadResult:
        keys = adapter or self._t.residency.current.get(reg.name)
        return LoadResult(
            info=self._t.info(reg),
            missing_keys=keys.missing_keys if keys is not None else (),
            unexpected_keys=keys.unexpected_keys if keys is not None else (),
            already_loaded=already_loaded,
        )

    # -- requests (the engine): see claims.py ---------------------------------------------------------

    def claim(self, name: str | None) -> Claim:
        """Claim ``name`` for one request (None: the bare base model): a lease, or a load to wait for."""
        return self._claims.claim(name)

    def claim_default(self) -> Claim:
        with self._t.lock:
            return self._claims.claim(self._t.default)

    def settle(self, claim: Claim) -> LoadedAdapter | None:
        return self._claims.settle(claim)

    def release(self, claim: Claim) -> None:
        self._claims.release(claim)

    def requeue_if_draining(self, claim: Claim) -> bool:
        """A waiting request gives back its lease on an adapter that must leave (see Claims)."""
        return self._claims.requeue_if_draining(claim)

    def add_load_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` is called (on the loader's thread) each time a load finishes, well or not."""
        self._claims.add_listener(listener)

    def remove_load_listener(self, listener: Callable[[], None]) -> None:
        self._claims.remove_listener(listener)

    @property
    def stats(self) -> ClaimStats:
        return self._claims.stats

    def waiting(self) -> tuple[int, int]:
        """Requests waiting (for a load under way, for the budget to make room)."""
        return self._claims.waiting()

    # -- removing and settings -----------------------------------------------------------------------

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Forget an adapter. Rows already running with it keep its weights until they finish; if it was the
        default, the default falls back to the bare base model."""
        t = self._t
        with t.lock:
            info = t.info(t.get(name))
            del t.registry[name]
            t.residency.remove(name)
            if t.default == name:
                t.default = None
            t.room.notify_all()
        t.notify(AdapterEvent(AdapterEventKind.UNLOAD, name, info.size_bytes))
        return info

    delete_adapter = unload_adapter  # PEFT's name

    def set_adapter(self, name: str | None) -> None:
        """Set the default adapter for callers that name none; None means the bare base model."""
        with self._t.lock:
            if name is not None:
                self._t.get(name)
            self._t.default = name

    def set_pinned(self, name: str, pinned: bool) -> AdapterInfo:
        with self._t.lock:
            reg = self._t.get(name)
            reg.pinned = pinned
            return self._t.info(reg)

    # -- queries --------------------------------------------------------------------------------------

    @property
    def default_adapter(self) -> str | None:
        return self._t.default

    @property
    def max_adapters(self) -> int:
        return self._t.residency.max_adapters

    @property
    def max_adapter_bytes(self) -> int | None:
        return self._t.residency.max_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes of every adapter copy in memory (resident ones, and unloaded ones rows still run with)."""
        with self._t.lock:
            return self._t.residency.held_bytes

    def list_adapters(self, *, state: AdapterState | None = None) -> list[AdapterInfo]:
        """Every registered adapter, by name (only those in ``state`` when given)."""
        with self._t.lock:
            infos = [self._t.info(reg) for _, reg in sorted(self._t.registry.items())]
        return [i for i in infos if state is None or i.state is state]

    def get_adapter(self, name: str) -> AdapterInfo:
        with self._t.lock:
            return self._t.info(self._t.get(name))

    # -- routing (library use) ------------------------------------------------------------------------

    def acquire(self, name: str | None, *, timeout: float | None = None) -> LoadedAdapter | None:
        """The adapter a caller will run with (None: the bare base model), loaded first if it is not resident.
        Holding the object keeps its weights alive whatever happens to the adapter later; it does not keep it
        resident (the engine holds claims instead)."""
        claim = self.claim(name)
        try:
            if claim.job is not None and not claim.job.done.wait(timeout):
                raise CapacityExceededError(f"adapter {name!r} did not load within {timeout} s", field="adapter")
            return self.settle(claim)
        finally:
            self.release(claim)

    def plan(self, rows: Sequence[LoadedAdapter | None]) -> RoutingPlan:
        """A routing plan for a batch whose row i uses rows[i]. Reuse it for every forward of that batch."""
        needs_grad = torch.is_grad_enabled() and any(a is not None and a.trainable for a in rows)
        with torch.set_grad_enabled(needs_grad):
            return build_plan([a.weights if a is not None else None for a in rows])

    @contextmanager
    def routing(self, rows: Sequence[str | LoadedAdapter | None]) -> Iterator[RoutingPlan]:
        """Run forwards in this block with row i routed to rows[i] (a name, a held adapter, or None)."""
        adapters = [self.acquire(r) if isinstance(r, str) else r for r in rows]
        with use_plan(self.plan(adapters)) as plan:
            yield plan
