"""A second gRPC stack talks to the server: grpclib (pure-Python HTTP/2 over h2, sharing nothing with grpc's C
core), with service stubs made by grpclib's own protoc plugin from protos/. It proves the wire contract (HTTP/2
framing, metadata, trailers, status details), not just the generated grpcio stubs.

The grpclib stubs are generated into the test's temporary folder at each run (milliseconds): they are a test
instrument, not a shipped client, so nothing is committed that could go stale. They import the messages from
the committed ``loramux.v1.*_pb2`` modules, as grpclib's plugin always does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.rpc import error_details_pb2

from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb
from tests.service.harness import Harness, wait_until

grpclib = pytest.importorskip("grpclib", reason="grpclib is a dev dependency: pip install -e '.[dev]'")
from grpc_health.v1 import health_pb2  # noqa: E402  (grpclib's own copy would clash in the descriptor pool)
from grpclib.client import Channel, UnaryUnaryMethod  # noqa: E402
from grpclib.const import Status  # noqa: E402
from grpclib.exceptions import GRPCError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROTOS = sorted((REPO / "protos" / "loramux" / "v1").glob("*.proto"))
PROMPT = "Prove that the sum"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def grpclib_stubs(out: Path) -> dict[str, ModuleType]:
    """protos/loramux/v1/*.proto -> grpclib service stubs (``*_grpc.py``) in ``out``, imported by file path."""
    import grpc_tools
    from grpc_tools import protoc

    plugin = Path(sys.executable).parent / "protoc-gen-grpclib_python"
    assert plugin.is_file(), f"grpclib's protoc plugin is missing: {plugin}"
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/timestamp.proto
    args = ["protoc", f"-I{REPO / 'protos'}", f"-I{well_known}", f"--plugin=protoc-gen-grpclib_python={plugin}"]
    assert protoc.main([*args, f"--grpclib_python_out={out}", *map(str, PROTOS)]) == 0
    modules = {}
    for proto in PROTOS:
        path = out / "loramux" / "v1" / f"{proto.stem}_grpc.py"
        spec = importlib.util.spec_from_file_location(f"grpclib_stubs_{proto.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # its `import loramux.v1.*_pb2` finds the committed messages
        modules[proto.stem] = module
    return modules


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    return grpclib_stubs(tmp_path_factory.mktemp("grpclib_stubs"))


def test_grpclib_calls_every_rpc(server: Harness, stubs, adapter_dirs):
    reference = server.generate(text=PROMPT, adapter="math", stopping=gpb.StoppingCriteria(max_new_tokens=6))
    ref_ids = [i for r in reference[:-1] for i in r.chunk.token_ids]  # the same request through grpcio

    async def scenario() -> None:
        async with Channel("127.0.0.1", server.port) as channel:
            adapters = stubs["adapter_service"].AdapterServiceStub(channel)
            generation = stubs["generation_service"].GenerationServiceStub(channel)
            health_check = UnaryUnaryMethod(  # what a generated grpclib stub holds
                channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
            )
            check = await health_check(health_pb2.HealthCheckRequest(service="loramux.v1.GenerationService"))
            assert check.status == health_pb2.HealthCheckResponse.SERVING

            loaded = await adapters.LoadAdapter(apb.LoadAdapterRequest(name="h2", source=str(adapter_dirs["poet"])))
            assert loaded.adapter.name == "h2" and not loaded.already_loaded
            listed = await adapters.ListAdapters(apb.ListAdaptersRequest())
            assert [a.name for a in listed.adapters] == ["h2", "math", "poet"]
            assert (await adapters.GetAdapter(apb.GetAdapterRequest(name="h2"))).adapter.rank == 8
            assert (await adapters.SetAdapter(apb.SetAdapterRequest(name="h2"))).adapter.is_default

            async with generation.Generate.open(metadata={"x-request-id": "h2-gen", "traceparent": TRACEPARENT}) as st:
                await st.send_message(
                    gpb.GenerateRequest(text=PROMPT, adapter="math", stopping=gpb.StoppingCriteria(max_new_tokens=6)),
                    end=True,
                )
                await st.recv_initial_metadata()
                assert st.initial_metadata is not None and st.initial_metadata["x-request-id"] == "h2-gen"
                messages = [m async for m in st]
            assert messages[-1].WhichOneof("event") == "finished" and messages[-1].finished.adapter == "math"
            assert [i for m in messages[:-1] for i in m.chunk.token_ids] == ref_ids  # same tokens, either stack

            default = await generation.Generate(gpb.GenerateRequest(text=PROMPT, stopping={"max_new_tokens": 2}))
            assert default[-1].finished.adapter == "h2"

            assert (await adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="h2"))).adapter.name == "h2"

    asyncio.run(scenario())


def test_grpclib_decodes_rich_errors(server: Harness, stubs):
    async def scenario() -> GRPCError:
        async with Channel("127.0.0.1", server.port) as channel:
            generation = stubs["generation_service"].GenerationServiceStub(channel)
            request = gpb.GenerateRequest(text=PROMPT, adapter="nope")
            with pytest.raises(GRPCError) as caught:
                await generation.Generate(request, metadata={"x-request-id": "h2-404"})
            return caught.value

    error = asyncio.run(scenario())
    assert error.status is Status.NOT_FOUND
    assert error.details is not None
    (info,) = [d for d in error.details if isinstance(d, error_details_pb2.ErrorInfo)]
    assert info.reason == "ADAPTER_NOT_FOUND" and info.domain == "loramux.dev"
    assert dict(info.metadata) == {"requestId": "h2-404", "adapter": "nope"}


def test_grpclib_cancel_and_deadline_free_the_engine_row(server: Harness, stubs, caplog):
    caplog.set_level("INFO", logger="loramux.access")
    long = gpb.GenerateRequest(text=PROMPT, stopping=gpb.StoppingCriteria(max_new_tokens=2000, ignore_eos=True))

    async def scenario() -> None:
        async with Channel("127.0.0.1", server.port) as channel:
            generation = stubs["generation_service"].GenerationServiceStub(channel)
            async with generation.Generate.open(metadata={"x-request-id": "h2-cancel"}) as stream:
                await stream.send_message(long, end=True)
                await stream.recv_message()
                await stream.recv_message()
                await stream.cancel()  # RST_STREAM(CANCEL)
            # Whichever deadline fires first wins the race: grpclib's own timer (asyncio.TimeoutError) or the
            # server's, from the grpc-timeout header it sent (status DEADLINE_EXCEEDED).
            with pytest.raises((asyncio.TimeoutError, GRPCError)) as caught:
                await generation.Generate(long, timeout=0.3, metadata={"x-request-id": "h2-deadline"})
            if isinstance(caught.value, GRPCError):
                assert caught.value.status is Status.DEADLINE_EXCEEDED

    asyncio.run(scenario())
    wait_until(lambda: "request_id=h2-cancel status=CANCELLED" in caplog.text, what="the server to see the cancel")
    wait_until(lambda: "request_id=h2-deadline status=" in caplog.text, what="the server to see the deadline")
    wait_until(lambda: server.engine is not None and server.engine.running_rows == 0, what="the rows to be freed")
