"""The grpc.aio server: both loramux services, standard health and reflection, start-up and graceful shutdown.

``create_server`` builds a server around an engine (tests pass a ready one) or around none (``serve`` loads the
model after the port is open, so health answers NOT_SERVING meanwhile). ``LoramuxServer.shutdown`` is the one
shutdown sequence: health NOT_SERVING, optional drain delay, refuse new work, ``server.stop(grace)`` (in-flight
streams may finish within the grace period), then stop the engine thread, and last the metrics endpoint
(``config.metrics_port``; Prometheus keeps seeing the drain).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loramux.core import Engine
from loramux.core.adapters.adapter import AdapterEvent
from loramux.core.errors import LoramuxError
from loramux.service.auth import token_roles
from loramux.service.config import ADAPTER_SERVICE, GENERATION_SERVICE, ServiceConfig
from loramux.service.metrics import Metrics
from loramux.service.runtime import Runtime, build_engine, on_own_thread
from loramux.service.servicer import AdapterServicer, GenerationServicer
from loramux.v1 import adapter_service_pb2_grpc, generation_service_pb2_grpc

log = logging.getLogger("loramux.service")
T = TypeVar("T")

SERVICES = (ADAPTER_SERVICE, GENERATION_SERVICE)
HEALTH_NAMES = ("", *SERVICES)  # "": the process; each service: model loaded and warm
Serving = health_pb2.HealthCheckResponse


class LoramuxServer:
    def __init__(
        self, config: ServiceConfig, runtime: Runtime, server: grpc.aio.Server, *, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.grpc_server = server
        self.metrics = metrics
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if metrics is not None and runtime.ready:
            metrics.attach(runtime.engine)

    @property
    def adapter_observer(self) -> Callable[[AdapterEvent], None] | None:
        """What build_engine should tell of adapter changes (the metrics, when on)."""
        return self.metrics.adapter_event if self.metrics is not None else None

    async def start(self) -> None:
        await self.health.set("", Serving.SERVING)
        status = Serving.SERVING if self.runtime.ready else Serving.NOT_SERVING
        for name in SERVICES:
            await self.health.set(name, status)
        if self.metrics is not None and self.config.metrics_port is not None:  # first: a taken port fails early
            self.metrics.serve(self.config.network.host, self.config.metrics_port)
        await self.grpc_server.start()

    async def attach(self, engine: Engine) -> None:
        """The model is loaded and warm: serve it."""
        self.runtime.attach(engine)
        if self.metrics is not None:
            self.metrics.attach(engine)
        for name in SERVICES:
            await self.health.set(name, Serving.SERVING)

    async def shutdown(self, grace: float | None = None) -> None:
        grace = self.config.grace_period_s if grace is None else grace
        log.info("shutting down (grace period %.1f s)", grace)
        await self.health.enter_graceful_shutdown()  # every name NOT_SERVING, pushed to Watch streams
        if self.config.drain_delay_s > 0:
            await asyncio.sleep(self.config.drain_delay_s)  # let load balancers see it; new RPCs still work
        self.runtime.stop_accepting()
        await self.grpc_server.stop(grace)  # refuse new calls; in-flight ones get `grace` seconds
        await asyncio.sleep(0)  # cancelled handlers' finally blocks run after stop() returns
        await asyncio.to_thread(self.runtime.close)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        log.info("stopped")


def create_server(config: ServiceConfig, *, engine: Engine | None = None) -> tuple[LoramuxServer, int]:
    """Build (not start) the server and bind its port; call inside the running event loop."""
    runtime = Runtime(config, engine=engine)
    metrics = Metrics(max_adapters=config.max_adapters) if config.metrics_port is not None else None
    server = grpc.aio.server(options=config.network.grpc_options())
    net = config.network
    address = f"{_host(net.host)}:{net.port}"
    port = (
        server.add_secure_port(address, net.tls.server_credentials()) if net.tls else server.add_insecure_port(address)
    )
    # The servicers come after the bind: the default replica id is the address actually bound (--port 0).
    replica = config.replica_id or default_replica_id(net.host, port)
    log.info("replica id %s (x-loramux-replica)", replica)
    adapters = AdapterServicer(runtime, observer=metrics, tokens=config.auth_tokens, replica=replica)
    generation = GenerationServicer(runtime, observer=metrics, tokens=config.auth_tokens, replica=replica)
    adapter_service_pb2_grpc.add_AdapterServiceServicer_to_server(adapters, server)
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
    wrapper = LoramuxServer(config, runtime, server, metrics=metrics)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return wrapper, port


def default_replica_id(host: str, port: int) -> str:
    """host:port as bound; a wildcard host (every interface) names nothing, so the machine's name stands in."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{_host(host)}:{port}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(config: ServiceConfig) -> int:
    """Run until SIGTERM/SIGINT. Prints the listening address, then loads the model. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the (long) model load
        loop.add_signal_handler(sig, stop.set)
    server, port = create_server(config)
    if config.auth_tokens is not None:
        counts = ", ".join(f"{n} {role.value}" for role, n in token_roles(config.auth_tokens).items())
        log.info("authorization required on loramux RPCs (tokens: %s)", counts)
    await server.start()
    tls = " (TLS)" if config.network.tls is not None else ""
    print(f"loramux listening on {_host(config.network.host)}:{port}{tls}", flush=True)
    if server.metrics is not None:
        print(f"loramux metrics on http://{_host(config.network.host)}:{server.metrics.port}/metrics", flush=True)
    loading = on_own_thread(
        functools.partial(build_engine, config, observer=server.adapter_observer), name="loramux-load"
    )
    stopping = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[Any]] = {loading, stopping}
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading.done():
        error = loading.exception()
        if error is not None:  # a bad flag or asset: the message says it all; anything else: traceback
            log.error("start-up failed: %s", error, exc_info=None if isinstance(error, LoramuxError) else error)
            exit_code = 1
        else:
            await server.attach(loading.result())
            print("loramux ready", flush=True)
            await stopping
    stopping.cancel()
    await server.shutdown(0 if exit_code else None)
    return exit_code
