"""The clients send x-loramux-adapter on Generate (the routing key of an adapter-hashing balancer) and report the
replica that served a call (x-loramux-replica): checked on a recording server, and against a real one."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import pytest

from loramux.client import AsyncLoramuxClient, LoramuxClient
from loramux.client.events import Completion
from loramux.v1 import generation_service_pb2 as gpb
from loramux.v1 import generation_service_pb2_grpc as gpb_grpc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
CASES = [  # generate options -> the x-loramux-adapter values sent
    ({"adapter": "math"}, ["math"]),
    ({"adapter_mix": {"poet": 0.3, "math": 0.7}}, ["poet"]),  # the mix's first member
    ({"adapter": ""}, []),  # the bare base model: no key (a balancer's base-model backend)
    ({}, []),  # the server's default: the caller cannot know which replica's default
]


class Recording(gpb_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.seen: list[list[str]] = []
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            self.seen.append([v for k, v in context.invocation_metadata() if k == "x-loramux-adapter"])
        context.send_initial_metadata((("x-request-id", "r"), ("x-loramux-replica", "replica-b")))
        yield gpb.GenerateResponse(chunk=gpb.TokenChunk(text="x", token_ids=[1]))
        yield gpb.GenerateResponse(finished=gpb.GenerationFinished(usage=gpb.Usage(completion_tokens=1)))


@pytest.fixture
def recording():
    servicer = Recording()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gpb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize(("options", "sent"), CASES)
def test_sync_client_sends_the_routing_key(recording, options, sent):
    servicer, target = recording
    with LoramuxClient(target, timeout=10) as client:
        done = list(client.generate_events("hi", **options))[-1]
    assert servicer.seen == [sent]
    assert isinstance(done, Completion) and done.replica == "replica-b" and done.request_id == "r"


@pytest.mark.parametrize(("options", "sent"), CASES)
def test_async_client_sends_the_routing_key(recording, options, sent):
    servicer, target = recording

    async def body() -> Completion:
        async with AsyncLoramuxClient(target, timeout=10) as client:
            events = [e async for e in client.generate_events("hi", **options)]
        assert isinstance(events[-1], Completion)
        return events[-1]

    done = asyncio.run(body())
    assert servicer.seen == [sent]
    assert done.replica == "replica-b"


def test_a_real_server_accepts_the_key_and_names_itself(server):
    with LoramuxClient(server.target, timeout=30) as client:
        for options in ({"adapter": "math"}, {"adapter_mix": {"poet": 0.5, "math": 0.5}}, {"adapter": ""}, {}):
            done = list(client.generate_events("Prove", max_new_tokens=2, **options))[-1]
            assert isinstance(done, Completion) and done.completion_tokens == 2
            assert done.replica == server.target  # the default replica id: the address bound
