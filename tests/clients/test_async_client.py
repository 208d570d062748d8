"""The asyncio client (loramux.client.aio) against a real in-process server, on its own event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pytest

from loramux.client import AsyncLoramuxClient, Completion, LoramuxClient, LoramuxRpcError, TextChunk
from tests.clients.test_client import reference_text
from tests.service.harness import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
T = TypeVar("T")


def run(server, body: Callable[[AsyncLoramuxClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncLoramuxClient(server.target, timeout=30) as client:
            return await body(client)

    return asyncio.run(main())


def test_generate_streams_the_same_text_as_the_sync_client(server):
    async def body(client: AsyncLoramuxClient) -> str:
        stream = client.generate("Prove that", adapter="math", max_new_tokens=10, ignore_eos=True)
        return "".join([t async for t in stream])

    text = run(server, body)
    assert text == reference_text(server.engine, "Prove that", "math", 10)
    with LoramuxClient(server.target, timeout=30) as sync:
        assert text == "".join(sync.generate("Prove that", adapter="math", max_new_tokens=10, ignore_eos=True))


def test_generate_events_end_with_a_completion(server):
    async def body(client: AsyncLoramuxClient) -> list:
        stream = client.generate_events("Prove that", adapter="", max_new_tokens=5, ignore_eos=True, request_id="a1")
        return [e async for e in stream]

    events = run(server, body)
    assert all(isinstance(e, TextChunk) for e in events[:-1])
    done = events[-1]
    assert isinstance(done, Completion)
    assert (done.finish_reason, done.adapter, done.completion_tokens, done.request_id) == ("length", "", 5, "a1")


def test_leaving_the_loop_cancels_the_generation(server):
    async def body(client: AsyncLoramuxClient) -> None:
        stream = client.generate_events("Prove", max_new_tokens=2000, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()  # what `async for` does when its task ends; here explicitly

    run(server, body)
    wait_until(lambda: server.engine.running_rows == 0, what="the abandoned row to leave the batch")
    assert server.gate.steps < 2000


def test_adapter_lifecycle(server, adapter_dirs):
    async def body(client: AsyncLoramuxClient) -> None:
        loaded = await client.load_adapter("extra", str(adapter_dirs["poet"]), pinned=True)
        assert loaded.adapter.name == "extra" and loaded.adapter.pinned and not loaded.already_loaded
        assert (await client.load_adapter("extra", str(adapter_dirs["poet"]))).already_loaded
        assert [a.name for a in await client.list_adapters(page_size=1)] == ["extra", "math", "poet"]
        assert (await client.get_adapter("extra")).rank == 8
        changed = await client.set_adapter("extra")
        assert changed.adapter.is_default and changed.previous_default_adapter == ""
        gone = await client.unload_adapter("extra")
        assert gone is not None and gone.is_default
        assert await client.unload_adapter("extra", allow_missing=True) is None
        assert await client.health() == "SERVING"

    run(server, body)


def test_errors_carry_decoded_details(server):
    async def not_found(client: AsyncLoramuxClient) -> None:
        await client.get_adapter("nope")

    async def bad_field(client: AsyncLoramuxClient) -> None:
        async for _ in client.generate("hi", top_p=2.0):
            pass

    with pytest.raises(LoramuxRpcError) as caught:
        run(server, not_found)
    err = caught.value
    assert err.code is grpc.StatusCode.NOT_FOUND and err.reason == "ADAPTER_NOT_FOUND"
    assert err.metadata["adapter"] == "nope" and err.metadata["requestId"]
    with pytest.raises(LoramuxRpcError) as caught:
        run(server, bad_field)
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert [f for f, _ in caught.value.field_violations] == ["sampling.top_p"]
