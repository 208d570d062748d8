"""A real loramux server in-process, for the service, client and CLI tests.

Nothing is downloaded: a tiny seeded Llama (hidden 32, 2 layers, vocab 320), a byte-level BPE tokenizer trained
here, and PEFT-made adapters in a temporary folder. Servers run on one asyncio loop in a background thread
(one loop for the whole session: grpc.aio objects are bound to their loop); tests drive them through the
generated *synchronous* stubs, exactly like an external client. ``StepGate`` (the engine's on_step hook) lets a
test hold the engine between decode steps, so cancellation, deadlines and shutdown are tested without sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from loramux.core import AdapterManager, Engine, EngineConfig
from loramux.core.adapters.sources import DEFAULT_SOURCES, AdapterSource
from loramux.core.model.loader import ModelSpec
from loramux.service import runtime
from loramux.service.config import NetworkConfig, ServiceConfig
from loramux.service.server import LoramuxServer, create_server
from loramux.v1 import adapter_service_pb2_grpc, generation_service_pb2, generation_service_pb2_grpc


@pytest.fixture(scope="session")
def model_dir(base_model, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model and its tokenizer saved as a folder, as `loramux-server --model` loads it."""
    folder = tmp_path_factory.mktemp("model")
    base_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- the server -----------------------------------------------------------------------------------------


class LoopThread:
    """One asyncio loop on a daemon thread; coroutines are run on it from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-aio-loop", daemon=True)
        self.thread.start()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return self.spawn(coro).result(timeout)


_LOOP: LoopThread | None = None


def loop_thread() -> LoopThread:
    global _LOOP
    if _LOOP is None:
        _LOOP = LoopThread()
    return _LOOP


class StepGate:
    """The engine's on_step hook: counts decode steps and, while closed, holds the engine thread."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.steps = 0
        self.held = threading.Event()  # set while the engine waits at a closed gate

    def __call__(self, batch_rows: int) -> None:
        self.steps += 1
        if not self._open.is_set():
            self.held.set()
            self._open.wait(timeout=30)
            self.held.clear()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a predicate (bounded), for state another thread changes without telling us."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        tick.wait(0.005)


@dataclass
class Harness:
    server: LoramuxServer
    port: int
    engine: Engine | None
    gate: StepGate
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.adapters = adapter_service_pb2_grpc.AdapterServiceStub(self.channel)
        self.generation = generation_service_pb2_grpc.GenerationServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, **fields: Any) -> list[generation_service_pb2.GenerateResponse]:
        timeout = fields.pop("timeout", 30)
        request = generation_service_pb2.GenerateRequest(**fields)
        return list(self.generation.Generate(request, timeout=timeout))

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def shutdown(self, grace: float = 0.0) -> None:
        loop_thread().run(self.server.shutdown(grace))


def service_config(**overrides: Any) -> ServiceConfig:
    engine = {k: overrides.pop(k) for k in list(overrides) if k in EngineConfig.__dataclass_fields__}
    config = ServiceConfig(
        model=ModelSpec(source="(in-process test model)"),
        network=NetworkConfig(host="127.0.0.1", port=0),
        engine=EngineConfig(**engine),
        grace_period_s=5.0,
        warm_up=False,
    )
    return replace(config, **overrides)


def build_engine(
    base_model,
    tokenizer,
    config: ServiceConfig,
    adapters: dict[str, Path],
    gate: StepGate,
    sources: Sequence[AdapterSource] = DEFAULT_SOURCES,
) -> Engine:
    model = copy.deepcopy(base_model)
    manager = AdapterManager(
        model,
        max_adapters=config.max_adapters,
        max_adapter_bytes=config.max_adapter_bytes,
        max_rank=config.max_rank,
        sources=sources,
        on_demand=runtime.on_demand(config),
    )
    for name, path in adapters.items():
        manager.load_adapter(str(path), name)
    return Engine(model, tokenizer, manager, config.engine, on_step=gate)


async def _start(config: ServiceConfig, engine: Engine | None) -> tuple[LoramuxServer, int]:
    server, port = create_server(config, engine=engine)
    await server.start()
    return server, port


@pytest.fixture
def make_server(base_model, tokenizer, adapter_dirs) -> Iterator[Callable[..., Harness]]:
    """make_server(adapters=..., with_engine=True, sources=..., **ServiceConfig/EngineConfig overrides) -> a started
    Harness. with_engine=False: the server runs as while its model loads (attach an engine later)."""
    started: list[Harness] = []

    def make(
        *,
        adapters: dict[str, Path] | None = None,
        with_engine: bool = True,
        sources: Sequence[AdapterSource] = DEFAULT_SOURCES,
        **overrides: Any,
    ) -> Harness:
        config = service_config(**overrides)
        gate = StepGate()
        chosen = adapter_dirs if adapters is None else adapters
        engine = build_engine(base_model, tokenizer, config, chosen, gate, sources) if with_engine else None
        server, port = loop_thread().run(_start(config, engine))
        harness = Harness(server, port, engine, gate)
        started.append(harness)
        return harness

    yield make
    for harness in started:
        harness.gate.open()
        harness.channel.close()
        try:
            harness.shutdown(0)
        finally:
            if harness.engine is not None:
                harness.engine.close(timeout=5)


@pytest.fixture
def server(make_server) -> Harness:
    """A started server with the adapters "math" and "poet" loaded; the bare base model is the default."""
    return make_server()


# -- decoding errors ------------------------------------------------------------------------------------


@dataclass
class Failure:
    """A failed call, with its google.rpc details decoded from the trailing metadata."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None
    precondition: error_details_pb2.PreconditionFailure | None
    retry: error_details_pb2.RetryInfo | None
    trailing: dict[str, Any]

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []


DETAIL_KINDS = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
)


def unpack_details(status: Any) -> dict[type, Any]:
    """The google.rpc details of a Status by kind; each kind at most once."""
    found: dict[type, Any] = {}
    for detail in status.details:
        for kind in DETAIL_KINDS:
            if detail.Is(kind.DESCRIPTOR):
                assert kind not in found, f"{kind.__name__} appears twice"
                found[kind] = kind()
                detail.Unpack(found[kind])
    return found


def failure_of(error: grpc.RpcError) -> Failure:
    call: Any = error
    status = rpc_status.from_call(call)  # also checks that code and message match the grpc status
    assert status is not None, f"no rich status in {call.code()}: {call.details()}"
    found = unpack_details(status)
    assert error_details_pb2.ErrorInfo in found, "every error carries exactly one ErrorInfo"
    info = found[error_details_pb2.ErrorInfo]
    assert info.domain == "loramux.dev" and info.metadata["requestId"]
    return Failure(
        code=call.code(),
        message=call.details(),
        info=info,
        bad_request=found.get(error_details_pb2.BadRequest),
        precondition=found.get(error_details_pb2.PreconditionFailure),
        retry=found.get(error_details_pb2.RetryInfo),
        trailing=dict(call.trailing_metadata() or ()),
    )


def expect_failure(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Failure:
    """Call a stub method (consuming a stream) and return its decoded failure."""
    with pytest.raises(grpc.RpcError) as caught:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    return failure_of(caught.value)
