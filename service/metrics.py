"""Prometheus metrics of one server, on their own HTTP port (``--metrics-port``; off without it).

Three sources, one registry per server (never the process-global one, so servers in one process don't clash):

* every finished RPC, through ``request_finished`` (the rpc.unary / rpc.streaming wrappers call it with
  the RPC's CallLog): requests by rpc, adapter and status, durations, tokens, time to first token and
  inter-token latency;
* the adapter manager's observer (``adapter_event``): loads (on demand among them), reloads after eviction,
  replacements, unloads, evictions by cause, load latency;
* a collector read at scrape time (``_StateCollector``): queue depth, running batch size, decode steps,
  registered and resident adapters, their bytes against the budget, resident hits and misses, requests
  waiting for an adapter load or for room in the budget, and ``loramux_lora_requests_info``, the gauge in
  vLLM's label format (max_lora, running_lora_adapters, waiting_lora_adapters; value: the Unix time of the
  scrape) that gateway routers (Gateway API Inference Extension) read for adapter affinity.

Adapter labels are bounded: a name is used only once it was registered in this server; a request naming any
other adapter (a typo, a failed load) is labelled ``(other)``. The bare base model, and RPCs about no
adapter, have the empty label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loramux.core import Engine, EngineLoad
from loramux.core.adapters.adapter import AdapterEvent, AdapterEventKind, AdapterInfo, AdapterState
from loramux.core.adapters.claims import ClaimStats
from loramux.core.adapters.manager import AdapterManager
from loramux.core.engine.prefix_cache import PrefixStats
from loramux.service.calls import MIX_LABEL, CallLog

log = logging.getLogger("loramux.service")

BASE_LABEL = ""  # the bare base model, or an RPC about no adapter
OTHER_LABEL = "(other)"  # a name that was never resident here

# Seconds. CPU serving of small models starts around a millisecond per token; large models on a busy GPU
# queue for tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_IDLE = EngineLoad(running=0, waiting=0, running_adapters=frozenset(), waiting_adapters=frozenset(), steps=0)


class Metrics:
    def __init__(self, *, max_adapters: int) -> None:
        self.max_adapters = max_adapters
        self.registry = reg = CollectorRegistry()
        self.port: int | None = None  # once serving
        self._engine: Engine | None = None
        self._known: set[str] = set()  # adapter names ever resident: the admitted label values
        self._http: WSGIServer | None = None

        self.requests = Counter(
            "loramux_requests", "Finished RPCs by method, adapter, status", ("rpc", "adapter", "status"), registry=reg
        )
        self.duration = Histogram(
            "loramux_request_duration_seconds", "RPC duration", ("rpc",), buckets=LATENCY_BUCKETS, registry=reg
        )
        self.prompt_tokens = Counter(
            "loramux_prompt_tokens", "Prompt tokens of admitted generations", ("adapter",), registry=reg
        )
        self.completion_tokens = Counter(
            "loramux_completion_tokens", "Tokens generated (as streamed)", ("adapter",), registry=reg
        )
        self.ttft = Histogram(
            "loramux_time_to_first_token_seconds",
            "From a Generate call's start to its first token (queueing, tokenizing and prefill included)",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "loramux_inter_token_latency_seconds",
            "Between consecutive tokens of one Generate stream",
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.loads = Counter(
            "loramux_adapter_loads",
            "Adapters registered and loaded (replacements, loads on demand included)",
            registry=reg,
        )
        self.on_demand_loads = Counter(
            "loramux_adapter_on_demand_loads",
            "Adapters registered by a request naming them (load on demand)",
            registry=reg,
        )
        self.reloads = Counter(
            "loramux_adapter_reloads", "Registered adapters loaded again after an eviction", registry=reg
        )
        self.unloads = Counter("loramux_adapter_unloads", "Adapters unloaded on request", registry=reg)
        self.evictions = Counter(
            "loramux_adapter_evictions",
            "Adapters evicted to make room (least recently used, unused), by the budget that needed it",
            ("cause",),
            registry=reg,
        )
        self.load_seconds = Histogram(
            "loramux_adapter_load_seconds",
            "Adapter load latency (fetch, validate, build, commit)",
            buckets=LOAD_BUCKETS,
            registry=reg,
        )
        reg.register(_StateCollector(self))

    # -- wiring ---------------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Observe this engine and its adapter manager (already resident adapters become known labels)."""
        engine.manager.observer = self.adapter_event
        self._known.update(info.name for info in engine.manager.list_adapters())
        self._engine = engine

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a daemon thread; returns the bound port (port 0: a free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- observations ---------------------------------------------------------------------------------

    def request_finished(self, call: CallLog, status: str) -> None:
        adapter = self.adapter_label(call.adapter)
        self.requests.labels(call.method, adapter, status).inc()
        self.duration.labels(call.method).observe(call.elapsed)
        if call.prompt_tokens:
            self.prompt_tokens.labels(adapter).inc(call.prompt_tokens)
        if call.completion_tokens:
            self.completion_tokens.labels(adapter).inc(call.completion_tokens)
        if call.first_token_s is not None:
            self.ttft.observe(call.first_token_s)
        for gap in call.token_gaps:
            self.itl.observe(gap)

    def adapter_event(self, event: AdapterEvent) -> None:
        """The AdapterManager observer: called on the thread that changed the adapters."""
        if event.kind in (AdapterEventKind.LOAD, AdapterEventKind.REPLACE):
            self._known.add(event.name)
            self.loads.inc()
            if event.on_demand:
                self.on_demand_loads.inc()
        elif event.kind is AdapterEventKind.RELOAD:
            self.reloads.inc()
        elif event.kind is AdapterEventKind.UNLOAD:
            self.unloads.inc()
        elif event.kind is AdapterEventKind.EVICT:
            self.evictions.labels(event.cause.value if event.cause is not None else "").inc()
        if event.kind in (AdapterEventKind.LOAD, AdapterEventKind.REPLACE, AdapterEventKind.RELOAD):
            self.load_seconds.observe(event.seconds)

    def adapter_label(self, name: str | None) -> str:
        if not name:
            return BASE_LABEL
        return name if name in self._known or name == MIX_LABEL else OTHER_LABEL


class _StateCollector(Collector):
    """Gauges read from the engine when Prometheus scrapes (no background thread, no stale series)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics, engine = self._metrics, self._metrics.engine
        load = engine.load() if engine is not None else _IDLE
        adapters = engine.manager.list_adapters(state=AdapterState.RESIDENT) if engine is not None else []
        yield GaugeMetricFamily(
            "loramux_num_requests_waiting", "Generate requests queued for a batch row (queue depth)", value=load.waiting
        )
        yield GaugeMetricFamily(
            "loramux_num_requests_running", "Generate requests in the decode batch (batch size)", value=load.running
        )
        yield CounterMetricFamily("loramux_engine_steps", "Decode steps run by the engine", value=load.steps)
        yield GaugeMetricFamily(
            "loramux_kv_cache_bytes",
            "Memory held by the batch's KV cache, spare room included",
            value=load.kv_cache_bytes,
        )
        yield GaugeMetricFamily(
            "loramux_kv_cache_max_bytes", "The KV budget (--max-kv-memory)", value=load.kv_cache_max_bytes
        )
        yield GaugeMetricFamily(
            "loramux_num_requests_waiting_kv",
            "Requests first in their queue waiting for room in the KV budget (at the last step)",
            value=load.waiting_kv,
        )
        yield GaugeMetricFamily(
            "loramux_kv_cache_tokens",
            "Token positions the running requests hold in the KV cache",
            value=load.kv_cache_tokens,
        )
        yield GaugeMetricFamily(
            "loramux_kv_cache_padded_tokens",
            "Rows x columns of the left-padded KV cache each decode step attends over (vs kv_cache_tokens: padding)",
            value=load.kv_cache_padded_tokens,
        )
        yield from _adapter_families(engine.manager if engine is not None else None, adapters)
        yield from _prefix_families(engine.prefix_stats() if engine is not None else PrefixStats())
        info_family = GaugeMetricFamily(
            "loramux_lora_requests_info",
            "Adapters of running and waiting requests (vLLM's lora_requests_info labels); value: Unix time",
            labels=("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
        )
        running, waiting = ",".join(sorted(load.running_adapters)), ",".join(sorted(load.waiting_adapters))
        max_lora = engine.manager.max_adapters if engine is not None else metrics.max_adapters
        info_family.add_metric((str(max_lora), running, waiting), time.time())
        yield info_family


def _prefix_families(stats: PrefixStats) -> Iterator[Metric]:
    """The prefix cache: lookups (one per prompt prefilled) that reused blocks or not, tokens saved, memory."""
    prefix = "loramux_prefix_cache"
    yield CounterMetricFamily(f"{prefix}_hits", "Prompts that reused cached blocks", value=stats.hits)
    yield CounterMetricFamily(
        f"{prefix}_misses", "Prompts that reused no cached block", value=stats.lookups - stats.hits
    )
    yield CounterMetricFamily(
        f"{prefix}_hit_tokens", "Prompt tokens not prefilled thanks to the cache", value=stats.hit_tokens
    )
    yield CounterMetricFamily(f"{prefix}_lookup_tokens", "Prompt tokens of every lookup", value=stats.lookup_tokens)
    yield CounterMetricFamily(f"{prefix}_evictions", "Blocks evicted to make room", value=stats.evictions)
    yield CounterMetricFamily(
        f"{prefix}_skipped_blocks",
        "Blocks not cached: no room, every block in the way held by a running request",
        value=stats.skipped,
    )
    yield GaugeMetricFamily(f"{prefix}_bytes", "Bytes of KV held by the prefix cache", value=stats.bytes)
    yield GaugeMetricFamily(
        f"{prefix}_max_bytes", "The prefix cache's budget (--prefix-cache-memory; 0: off)", value=stats.max_bytes
    )
    yield GaugeMetricFamily(f"{prefix}_blocks", "Blocks held by the prefix cache", value=stats.blocks)


def _adapter_families(manager: AdapterManager | None, resident: list[AdapterInfo]) -> Iterator[Metric]:
    """The adapters: registered and resident, bytes against the budget, hits and misses, waiting requests."""
    stats = manager.stats if manager is not None else ClaimStats()
    loading, budget = manager.waiting() if manager is not None else (0, 0)
    registered = len(manager.list_adapters()) if manager is not None else 0
    yield GaugeMetricFamily("loramux_adapters_registered", "Adapters registered, resident or not", value=registered)
    yield GaugeMetricFamily("loramux_adapters_resident", "Adapters resident in memory", value=len(resident))
    max_count = manager.max_adapters if manager is not None else 0
    yield GaugeMetricFamily("loramux_adapters_max", "Resident adapters at most (--max-adapters)", value=max_count)
    held = manager.resident_bytes if manager is not None else 0
    yield GaugeMetricFamily(
        "loramux_adapters_resident_bytes",
        "Bytes of adapter weights in memory (resident ones, and unloaded ones that running requests still use)",
        value=held,
    )
    max_bytes = manager.max_adapter_bytes if manager is not None else None
    yield GaugeMetricFamily(
        "loramux_adapters_max_bytes",
        "Resident adapter bytes at most (--max-adapter-memory; 0: no limit)",
        value=max_bytes or 0,
    )
    per_adapter = GaugeMetricFamily("loramux_adapter_bytes", "Bytes of each resident adapter", labels=("adapter",))
    for info in resident:
        per_adapter.add_metric((info.name,), info.size_bytes)
    yield per_adapter
    yield CounterMetricFamily(
        "loramux_adapter_resident_hits",
        "Generate requests whose adapter was resident when they arrived",
        value=stats.hits,
    )
    yield CounterMetricFamily(
        "loramux_adapter_resident_misses", "Generate requests that waited for their adapter to load", value=stats.misses
    )
    yield GaugeMetricFamily(
        "loramux_num_requests_waiting_adapter_load", "Generate requests waiting for their adapter's load", value=loading
    )
    yield GaugeMetricFamily(
        "loramux_num_requests_waiting_adapter_budget",
        "Generate requests whose adapter is loaded and waits for room in the adapter budget (adapters in use)",
        value=budget,
    )
