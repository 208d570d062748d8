"""What the servicers call: the engine and its adapter manager, reached only from worker threads.

Blocking work never runs on the event loop: ``Engine.submit`` (which tokenizes) and the adapter manager's
reads run in a small thread pool; LoadAdapter (files, maybe from the Hub, and tensor work) runs on a thread of
its own that ends with it (see ``on_own_thread``); the model itself only ever runs on the engine's own thread.
Until the base model is loaded every call fails with UNAVAILABLE (MODEL_LOADING); once draining, mutations and
new generations fail with UNAVAILABLE (SHUTTING_DOWN).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from loramux.core import AdapterManager, AdapterSelection, Engine, EventChannel, GenerationRequest
from loramux.core.adapters.adapter import AdapterEvent, AdapterInfo, LoadResult
from loramux.core.adapters.on_demand import OnDemand
from loramux.core.adapters.sources import restricted_sources
from loramux.core.errors import AdapterNotFoundError, ShuttingDownError
from loramux.core.model.loader import load_base_model
from loramux.service.config import ServiceConfig
from loramux.service.errors import ModelLoadingError

log = logging.getLogger("loramux.service")
T = TypeVar("T")


@dataclass(frozen=True)
class AdapterLoad:
    """A LoadAdapter request, checked at the edge (convert.load_request)."""

    name: str
    source: str
    revision: str | None = None
    subfolder: str | None = None
    replace: bool = False
    pinned: bool = False
    autocast_adapter_dtype: bool = True


class Runtime:
    def __init__(self, config: ServiceConfig, *, engine: Engine | None = None) -> None:
        self.config = config
        self.limits = config.limits()
        self._engine = engine
        # Where LoadAdapter may read from when the configuration restricts it (None: the manager's own sources).
        # Preloaded adapters are the operator's and are not restricted.
        restricted = config.adapter_roots is not None or not config.allow_hub_adapters
        self._rpc_sources = (
            restricted_sources(
                local_roots=[Path(r) for r in config.adapter_roots] if config.adapter_roots is not None else None,
                allow_hub=config.allow_hub_adapters,
            )
            if restricted
            else None
        )
        self._draining = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="loramux-rpc")
        # Generate's tokenizing and admission on workers of their own: adapter RPCs never wait behind them, and
        # each is bounded (a text over the engine's byte cap is refused on the loop, untokenized).
        self._submit_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="loramux-submit")

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def accepting(self) -> bool:
        return self.ready and not self._draining

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ModelLoadingError("the server is still loading its base model; retry shortly")
        return self._engine

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        self.limits.update(engine_limits(engine))  # what the engine resolved against its model (in place: shared)

    def stop_accepting(self) -> None:
        self._draining = True
        if self._engine is not None:
            self._engine.stop_accepting()

    def close(self, *, timeout: float = 10.0) -> None:
        """Blocking: stop the engine thread and the worker pool."""
        self._draining = True
        if self._engine is not None:
            self._engine.close(timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._submit_pool.shutdown(wait=False, cancel_futures=True)

    # -- generation -----------------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> EventChannel:
        """Engine.submit (which tokenizes) on the submit pool, after the checks that need no tokenizing, here on
        the loop: an oversize prompt is refused at once and never holds a worker. If the caller is cancelled
        meanwhile, the request is cancelled too."""
        engine = self.engine
        engine.precheck(request)
        future = self._submit_pool.submit(engine.submit, request)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(_cancel_channel)
            raise

    async def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids as Generate sees them, on the submit pool (after the same precheck)."""
        engine = self.engine
        engine.precheck(request)
        return await asyncio.wrap_future(self._submit_pool.submit(engine.tokenize, request))

    # -- adapters -------------------------------------------------------------------------------------

    @property
    def manager(self) -> AdapterManager:
        return self.engine.manager

    def _mutable_manager(self) -> AdapterManager:
        manager = self.manager
        if self._draining:
            raise ShuttingDownError("the server is shutting down and accepts no adapter changes")
        return manager

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._pool.submit(fn))

    async def load_adapter(self, load: AdapterLoad) -> LoadResult:
        manager, cfg = self._mutable_manager(), self.config
        return await on_own_thread(
            lambda: manager.load_adapter(
                load.source,
                load.name,
                revision=load.revision,
                subfolder=load.subfolder,
                replace=load.replace,
                pinned=load.pinned,
                autocast_adapter_dtype=load.autocast_adapter_dtype,
                token=cfg.hub_token,
                cache_dir=cfg.hub_cache_dir,
                sources=self._rpc_sources,
            ),
            name="loramux-load-adapter",
        )

    async def unload_adapter(self, name: str, *, allow_missing: bool) -> AdapterInfo | None:
        manager = self._mutable_manager()

        def unload() -> AdapterInfo | None:
            try:
                return manager.unload_adapter(name)
            except AdapterNotFoundError:
                if allow_missing:
                    return None
                raise

        return await self._run(unload)

    async def set_default(self, name: str | None) -> tuple[AdapterInfo | None, str | None]:
        """Make ``name`` (None: the bare base model) the default. Returns (its info, the previous default)."""
        manager = self._mutable_manager()

        def set_default() -> tuple[AdapterInfo | None, str | None]:
            previous = manager.default_adapter
            manager.set_adapter(name)
            return (manager.get_adapter(name) if name is not None else None), previous

        return await self._run(set_default)

    async def get_adapter(self, name: str) -> AdapterInfo:
        manager = self.manager
        return await self._run(lambda: manager.get_adapter(name))

    async def list_adapters(self) -> tuple[list[AdapterInfo], str | None]:
        """Every loaded adapter, by name, and the default adapter's name."""
        manager = self.manager
        return await self._run(lambda: (manager.list_adapters(), manager.default_adapter))


def engine_limits(engine: Engine) -> dict[str, int]:
    """The limits an engine resolved against its model, by their API name."""
    limits = {"maxTotalTokens": engine.limits.max_total_tokens, "maxKvMemory": engine.limits.kv.max_bytes}
    if engine.limits.model_len is not None:
        limits["maxModelLen"] = engine.limits.model_len
    return limits


def _cancel_channel(future: concurrent.futures.Future[EventChannel]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


def build_engine(config: ServiceConfig, *, observer: Callable[[AdapterEvent], None] | None = None) -> Engine:
    """Load the base model, preload (pinned) adapters, set the default, warm up. Blocking: call off the loop.
    ``observer`` is told of every adapter change from the first preload on (the metrics)."""
    model, tokenizer = load_base_model(config.model)
    manager = AdapterManager(
        model,
        max_adapters=config.max_adapters,
        max_adapter_bytes=config.max_adapter_bytes,
        max_rank=config.max_rank,
        on_demand=on_demand(config),
        observer=observer,
    )
    for preload in config.adapters:
        log.info("loading adapter %s from %s", preload.name, preload.source)
        manager.load_adapter(
            preload.source, preload.name, pinned=True, token=config.hub_token, cache_dir=config.hub_cache_dir
        )
    if config.default_adapter:
        manager.set_adapter(config.default_adapter)
    engine = Engine(model, tokenizer, manager, config.engine)
    if config.warm_up:
        warm_up(engine)
    return engine


def on_demand(config: ServiceConfig) -> OnDemand | None:
    """Where Generate looks for adapters nobody registered (--load-on-demand): the adapter roots, then the Hub."""
    if not config.load_on_demand:
        return None
    roots = [Path(r) for r in config.adapter_roots or ()]
    return OnDemand(
        roots=roots, allow_hub=config.allow_hub_adapters, token=config.hub_token, cache_dir=config.hub_cache_dir
    )


def warm_up(engine: Engine) -> None:
    """One tiny generation through the whole path (first forward passes are slow), then ready."""
    request = GenerationRequest(prompt=(0,), adapter=AdapterSelection.BASE, max_new_tokens=1, ignore_eos=True)
    for _ in engine.submit(request):
        pass


def on_own_thread(fn: Callable[[], T], *, name: str) -> asyncio.Future[T]:
    """Run blocking torch work on a daemon thread of its own that ends with it, from the event loop.

    Why not a pool: every thread that runs torch ops keeps an OpenMP thread pool for as long as it lives,
    and two live pools make libgomp throttle its spin-waits, which slowed the engine's decode steps by a
    third on 2 cores (bench/engine.py). A thread that ends takes its pool with it. A daemon thread also
    lets a signal during a long load stop the process without waiting for it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop already closed: the server stopped while this was running
            pass

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
