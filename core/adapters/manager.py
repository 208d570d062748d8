"""The adapter manager: PEFT's load_adapter/set_adapter/delete_adapter, made safe for concurrent serving.

Loading reads, validates and builds everything *outside* the model first; only a fully checked adapter is
committed (under a lock), so a failed load leaves no trace. The default adapter is just a name consulted by
callers that name none; routing never reads it. Rows pick adapters through explicit routing plans.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from loramux.core.adapters.adapter import AdapterEvent, AdapterEventKind, AdapterInfo, LoadedAdapter, LoadResult
from loramux.core.adapters.eviction import choose_victim
from loramux.core.adapters.loading import LoadOptions, read_adapter_weights, read_state_dict
from loramux.core.adapters.names import validate_adapter_name
from loramux.core.adapters.sources import DEFAULT_SOURCES, AdapterLocation, AdapterSource, fetch_adapter_files
from loramux.core.adapters.spec import LoraSpec
from loramux.core.adapters.targeting import resolve_modules_to_save, resolve_targets
from loramux.core.errors import (
    AdapterAlreadyExistsError,
    AdapterNotFoundError,
    CapacityExceededError,
    InvalidArgumentError,
)
from loramux.core.lora.layers import unwrapped_copy, wrap_modules
from loramux.core.lora.routing import RoutingPlan, build_plan, use_plan

log = logging.getLogger(__name__)


class AdapterManager:
    """Many LoRA adapters over one base model, with per-row routing.

    max_adapters: resident adapters at most; loading past it evicts the least recently used one that is
    neither pinned nor the default. max_rank: adapters with a larger per-module rank are refused.
    observer: told of every load, replace, unload and eviction (an AdapterEvent), on the thread that made the
    change, possibly with the manager's lock held: it must be quick and must not call back into the manager.
    It may also be set later (attribute ``observer``); its exceptions are logged, never raised.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_adapters: int = 64,
        max_rank: int = 256,
        sources: Sequence[AdapterSource] = DEFAULT_SOURCES,
        observer: Callable[[AdapterEvent], None] | None = None,
    ) -> None:
        if max_rank < 1:
            raise InvalidArgumentError(f"max_rank must be >= 1 (got {max_rank})", field="max_rank")
        if max_adapters < 1:
            raise InvalidArgumentError(f"max_adapters must be >= 1 (got {max_adapters})", field="max_adapters")
        self.model = model
        self.max_rank = max_rank
        self._sources = tuple(sources)
        self._modules = dict(model.named_modules())  # original names, captured before any wrapping
        self._base_params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
        output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
        self._output_embedding_name = next(
            (n for n, m in self._modules.items() if m is output_embeddings and output_embeddings is not None),
            None,
        )
        self._adapters: dict[str, LoadedAdapter] = {}
        self.max_adapters = max_adapters
        self._default: str | None = None
        self._lock = threading.RLock()
        self.observer = observer

    # -- lifecycle ------------------------------------------------------------------------------------

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
        """Load a PEFT LoRA adapter from a folder or the Hub. It does not become the default (as in PEFT).

        ``sources``: where this load may come from, instead of the manager's own (a server passes restricted
        ones for loads its clients ask for; see sources.restricted_sources).

        low_cpu_mem_usage is accepted for PEFT compatibility: loramux always builds each tensor once, directly
        in its final dtype and device, with no randomly initialised copy. ephemeral_gpu_offload does the
        load-time dtype casts on CUDA when the base lives on the CPU; without CUDA it has no effect.
        """
        del low_cpu_mem_usage  # always the case, see above
        started = time.monotonic()
        validate_adapter_name(adapter_name)
        location = AdapterLocation(model_id, subfolder or None, revision or None, cache_dir, token)
        with self._lock:
            existing = self._adapters.get(adapter_name)
            if existing is not None and existing.location.identity() == location.identity():
                return self._result(existing, already_loaded=True)
            if existing is not None and not replace:
                raise AdapterAlreadyExistsError(
                    f"adapter {adapter_name!r} is already loaded from {existing.location.model_id!r}"
                    f" (revision {existing.location.revision!r}); pass replace to swap it",
                    field="name",
                )
        options = LoadOptions(
            read_device=torch.device(torch_device) if torch_device is not None else None,
            autocast_adapter_dtype=autocast_adapter_dtype,
            trainable=is_trainable,
            max_rank=self.max_rank,
            work_device=_ephemeral_device(ephemeral_gpu_offload),
        )
        adapter = self._build(location, adapter_name, options, pinned=pinned, sources=sources or self._sources)
        with self._lock:
            result = self._commit(adapter, replace=replace)
        if not result.already_loaded:
            seconds = time.monotonic() - started
            kind = AdapterEventKind.REPLACE if adapter.version > 1 else AdapterEventKind.LOAD
            self._notify(AdapterEvent(kind, adapter_name, adapter.weights.nbytes, seconds))
        return result

    def _build(
        self,
        location: AdapterLocation,
        name: str,
        options: LoadOptions,
        *,
        pinned: bool,
        sources: Sequence[AdapterSource],
    ) -> LoadedAdapter:
        """Everything that can fail, with no shared state touched."""
        files = fetch_adapter_files(location, sources)
        spec = LoraSpec.from_file(files.config)
        targets = resolve_targets(spec, self._modules, output_embedding_name=self._output_embedding_name)
        saved = resolve_modules_to_save(spec, self._modules)
        state = read_state_dict(files.weights, options.read_device or _model_device(self.model))
        loaded = read_adapter_weights(
            spec=spec,
            targets=targets,
            saved_module_names=saved,
            state=state,
            modules=self._modules,
            base_params=self._base_params,
            adapter_name=name,
            options=options,
            copy_module=unwrapped_copy,
        )
        return LoadedAdapter(
            name=name,
            location=location,
            files=files,
            spec=spec,
            targets=targets,
            weights=loaded.weights,
            missing_keys=loaded.missing_keys,
            unexpected_keys=loaded.unexpected_keys,
            trainable=options.trainable,
            pinned=pinned,
        )

    def _commit(self, adapter: LoadedAdapter, *, replace: bool) -> LoadResult:
        existing = self._adapters.get(adapter.name)
        if existing is not None:
            if existing.location.identity() == adapter.location.identity():
                return self._result(existing, already_loaded=True)  # a concurrent load won the race
            if not replace:
                raise AdapterAlreadyExistsError(f"adapter {adapter.name!r} is already loaded", field="name")
            adapter.version = existing.version + 1
        elif len(self._adapters) >= self.max_adapters:
            self._evict_one()
        wrap_modules(self.model, adapter.weights.module_names, self._modules)
        self._adapters[adapter.name] = adapter
        return self._result(adapter, already_loaded=False)

    def _evict_one(self) -> None:
        victim = choose_victim(self._adapters.values(), default=self._default)
        if victim is None:
            raise CapacityExceededError(
                f"all {self.max_adapters} resident adapters are pinned or the default",
                field="max_adapters",
            )
        self._remove(victim.name)
        self._notify(AdapterEvent(AdapterEventKind.EVICT, victim.name, victim.weights.nbytes))

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Remove an adapter. Rows already running with it keep its weights until they finish; if it was the
        default, the default falls back to the bare base model."""
        with self._lock:
            adapter = self._get(name)
            info = adapter.info(is_default=name == self._default)
            self._remove(name)
        self._notify(AdapterEvent(AdapterEventKind.UNLOAD, name, info.size_bytes))
        return info

    delete_adapter = unload_adapter  # PEFT's name

    def _remove(self, name: str) -> None:
        self._adapters.pop(name)
        if self._default == name:
            self._default = None

    def _notify(self, event: AdapterEvent) -> None:
        observer = self.observer
        if observer is None:
            return
        try:
            observer(event)
        except Exception:
            log.exception("adapter observer failed on %s", event)

    def set_adapter(self, name: str | None) -> None:
        """Set the default adapter for callers that name none; None means the bare base model."""
        with self._lock:
            if name is not None:
                self._get(name)
            self._default = name

    def set_pinned(self, name: str, pinned: bool) -> AdapterInfo:
        with self._lock:
            adapter = self._get(name)
            adapter.pinned = pinned
            return adapter.info(is_default=name == self._default)

    # -- queries -------------------------------------------------------------------------------------

    @property
    def default_adapter(self) -> str | None:
        return self._default

    def list_adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [a.info(is_default=a.name == self._default) for _, a in sorted(self._adapters.items())]

    def get_adapter(self, name: str) -> AdapterInfo:
        with self._lock:
            return self._get(name).info(is_default=name == self._default)

    def _get(self, name: str) -> LoadedAdapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {known})", field="adapter")
        return adapter

    def _result(self, adapter: LoadedAdapter, *, already_loaded: bool) -> LoadResult:
        return LoadResult(
            info=adapter.info(is_default=adapter.name == self._default),
            missing_keys=adapter.missing_keys,
            unexpected_keys=adapter.unexpected_keys,
            already_loaded=already_loaded,
        )

    # -- routing -------------------------------------------------------------------------------------

    def acquire(self, name: str | None) -> LoadedAdapter | None:
        """The adapter a request will run with (None: the bare base model). Holding the returned object keeps
        its weights alive even if the adapter is unloaded or replaced meanwhile."""
        if name is None:
            return None
        with self._lock:
            adapter = self._get(name)
            adapter.last_used = time.time()
            return adapter

    def resolve_default(self) -> LoadedAdapter | None:
        with self._lock:
            return self.acquire(self._default)

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


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ephemeral_device(requested: bool) -> torch.device | None:
    return torch.device("cuda") if requested and torch.cuda.is_available() else None
