"""Requests and adapters: a request *claims* the adapter it names, and gives the claim back when it leaves.

A resident adapter is leased at once (an adapter with users is never evicted). Any other is loaded by one job
that every request naming it waits on (single flight), on the loader's thread: built, then made resident as
soon as the budget has room (while it has none, the job waits, and the least recently used adapter in use
is *drained*: it takes no new requests, so it leaves when its rows finish), then leased once per waiter.
A name nobody registered is located on demand (``on_demand``) and registered by its first successful load;
a load that fails fails every request waiting on it, with its error, and changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from loramux.core.adapters.adapter import AdapterEvent, AdapterEventKind, LoadedAdapter, Registration
from loramux.core.adapters.jobs import Loader, LoadJob
from loramux.core.adapters.loading import LoadOptions
from loramux.core.adapters.names import validate_adapter_name
from loramux.core.adapters.on_demand import OnDemand
from loramux.core.adapters.table import AdapterTable, no_room
from loramux.core.errors import AdapterSourceNotFoundError, EngineFailure, LoramuxError

log = logging.getLogger("loramux.core.adapters.manager")


@dataclass(eq=False)
class Claim:
    """What a request holds for its adapter: a lease on it, or the load it waits for (``settle`` turns the
    second into the first). Give it back with ``release`` whatever happens to the request."""

    adapter: LoadedAdapter | None = None
    job: LoadJob | None = None

    @property
    def ready(self) -> bool:
        return self.job is None or self.job.done.is_set()


@dataclass
class ClaimStats:
    hits: int = 0  # requests whose adapter was resident
    misses: int = 0  # requests that had to wait for a load


class Claims:
    def __init__(self, table: AdapterTable, *, max_rank: int, on_demand: OnDemand | None) -> None:
        self._t, self._max_rank, self._on_demand = table, max_rank, on_demand
        self._loader = Loader(self._run_job)
        self._listeners: list[Callable[[], None]] = []
        self.stats = ClaimStats()

    def claim(self, name: str | None) -> Claim:
        """Claim ``name`` for one request (None: the bare base model). Raises AdapterNotFoundError (not
        registered, no load on demand) or CapacityExceededError (it can never fit beside the pinned ones)."""
        if name is None:
            return Claim()
        t = self._t
        with t.lock:
            reg = t.registry.get(name)
            if reg is None and self._on_demand is None:
                raise t.not_found(name)
            if reg is None:
                validate_adapter_name(name, field="adapter")  # on demand, the name becomes a path under a root
            if reg is not None:
                reg.requests, reg.last_used = reg.requests + 1, time.time()
                loaded = t.residency.current.get(name)
                if loaded is not None and not loaded.draining:
                    t.residency.lease(loaded)
                    self.stats.hits += 1
                    return Claim(adapter=loaded)
                cause = t.residency.never_fits(reg.summary.size_bytes, default=t.default, name=name)
                if cause is not None:
                    raise no_room(cause, t.residency, busy=False)
            self.stats.misses += 1
            return Claim(job=self._wait_for(name, reg))

    def _wait_for(self, name: str, reg: Registration | None) -> LoadJob:
        """Lock held: one more waiter on the load of ``name`` (as ``reg``), started if none is under way."""
        job = self._t.jobs.get((name, reg))
        if job is None:
            job = self._t.jobs[(name, reg)] = LoadJob(name, reg)
            self._loader.submit(job)
        job.waiters += 1
        return job

    def requeue_if_draining(self, claim: Claim) -> bool:
        """A waiting request whose adapter is draining (it must leave for a load that waits for room) gives
        its lease back and waits for the adapter's next load instead; True when it did. Without this, requests
        queued behind a burst would keep a drained adapter in use until the whole burst ran."""
        t = self._t
        with t.lock:
            adapter = claim.adapter
            if adapter is None or not adapter.draining:
                return False
            t.residency.release(adapter)
            claim.adapter, claim.job = None, self._wait_for(adapter.name, adapter.registration)
            t.room.notify_all()
            return True

    def settle(self, claim: Claim) -> LoadedAdapter | None:
        """Once ``claim.ready``: its adapter (leased), or the load's error raised (the claim is then spent)."""
        job = claim.job
        if job is not None:
            if job.error is not None:
                claim.job = None
                raise job.error
            claim.adapter, claim.job = job.adapter, None
        return claim.adapter

    def release(self, claim: Claim) -> None:
        """Give a claim back (its row finished, failed or was cancelled). Idempotent."""
        t = self._t
        with t.lock:
            adapter, job = claim.adapter, claim.job
            claim.adapter = claim.job = None
            if job is not None:
                adapter = job.adapter  # None: the load is still under way (or failed): stop waiting for it
                job.waiters -= adapter is None and job.error is None
            if adapter is not None:
                t.residency.release(adapter)
            t.room.notify_all()

    def add_listener(self, listener: Callable[[], None]) -> None:
        with self._t.lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with self._t.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def waiting(self) -> tuple[int, int]:
        """Requests waiting (for a load under way, for the budget to make room)."""
        with self._t.lock:
            jobs = list(self._t.jobs.values())
        loading = sum(j.waiters for j in jobs if not j.waiting_for_room)
        return loading, sum(j.waiters for j in jobs if j.waiting_for_room)

    # -- the loader's thread --------------------------------------------------------------------------

    def _run_job(self, job: LoadJob) -> None:
        """Build, wait for room, make resident and lease to every waiter. The job leaves the table under the
        same lock that settles it, so no request joins a job that already ended."""
        t, started = self._t, time.monotonic()
        adapter: LoadedAdapter | None = None
        error: LoramuxError | None = None
        try:
            adapter = self._build(job)
        except LoramuxError as exc:
            error = exc
        except Exception as exc:
            log.exception("loading adapter %r failed", job.name)
            error = EngineFailure(f"loading adapter {job.name!r} failed inside the server")
            error.__cause__ = exc
        with t.lock:
            if adapter is not None:
                try:
                    self._commit_when_room(job, adapter)
                except LoramuxError as exc:
                    error = exc
            job.error = error
            t.jobs.pop((job.name, job.registration), None)
            job.done.set()
            listeners = list(self._listeners)
        if job.adapter is not None and job.adapter is adapter:
            kind = AdapterEventKind.LOAD if job.registration is None else AdapterEventKind.RELOAD
            on_demand = job.registration is None
            t.notify(AdapterEvent(kind, job.name, adapter.nbytes, time.monotonic() - started, on_demand=on_demand))
        for listener in listeners:
            listener()

    def _build(self, job: LoadJob) -> LoadedAdapter:
        reg, builder = job.registration, self._t.builder
        if reg is not None:
            return builder.build(reg.location, reg.name, reg.options, sources=reg.sources, pinned=reg.pinned)
        assert self._on_demand is not None
        located = self._on_demand.locate(job.name)
        options = LoadOptions(read_device=None, autocast_adapter_dtype=True, trainable=False, max_rank=self._max_rank)
        try:
            return builder.build(located.location, job.name, options, sources=self._on_demand.sources, on_demand=True)
        except AdapterSourceNotFoundError as exc:  # the last place looked at (the Hub) has no such repo either
            raise self._on_demand.not_found(job.name, located.searched) from exc

    def _commit_when_room(self, job: LoadJob, adapter: LoadedAdapter) -> None:
        """Lock held: make ``adapter`` resident for the job's waiters once the budget has room (waiting, and
        draining an adapter in use, while it has none). A stale load (the name was replaced or unloaded
        meanwhile) serves its waiters only; a copy that became resident meanwhile is served instead."""
        t = self._t
        try:
            self._commit_waiting(job, adapter)
        finally:
            # Only a job waiting for room drains, and one job runs at a time: whatever ended this one's wait
            # (its commit, a resident or stale copy served, every waiter giving up), nothing drains any more.
            # A drain left behind would refuse its adapter to every new request, and the next load of it
            # would wait for its eviction forever (the soak found this).
            job.waiting_for_room = False
            t.residency.stop_draining()

    def _commit_waiting(self, job: LoadJob, adapter: LoadedAdapter) -> None:
        t = self._t
        while job.waiters > 0:
            resident = t.residency.current.get(job.name)
            if resident is not None and resident.registration is job.registration and not resident.draining:
                t.residency.lease(resident, job.waiters)
                job.adapter = resident
                return
            current = t.registry.get(job.name)
            if job.registration is None and current is None:
                current = adapter.registration  # on demand: this load registers it
            if current is not job.registration and current is not adapter.registration:
                t.residency.lease(adapter, job.waiters)
                t.residency.add_retired(adapter)
                job.adapter = adapter
                return
            if resident is None and t.make_room(adapter):
                break
            job.waiting_for_room = True
            t.residency.drain_one(default=t.default)
            t.room.wait(timeout=1.0)  # woken when an adapter may have become evictable; re-checked anyway
        else:
            return  # every waiter gave up
        reg = t.registry.setdefault(job.name, adapter.registration)
        if reg is not adapter.registration:  # a reload: the files may have changed since the last load
            if adapter.registration.fingerprint != reg.fingerprint:
                reg.version += 1
                log.info("adapter %s changed on its source since its last load: version %d", reg.name, reg.version)
            reg.fingerprint, reg.summary = adapter.registration.fingerprint, adapter.summary()
            adapter.registration = reg
        else:
            reg.requests, reg.last_used = job.waiters, time.time()
        adapter.version = reg.version
        t.make_resident(adapter, users=job.waiters)
        job.adapter = adapter
