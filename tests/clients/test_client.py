"""The typed sync client (loramux.client.sync) against a real in-process server."""

from __future__ import annotations

import grpc
import pytest

from loramux.client import Completion, LoramuxClient, LoramuxRpcError, TextChunk
from loramux.core import GenerationRequest, TokenDelta
from tests.service.harness import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def client(server):
    with LoramuxClient(server.target, timeout=30) as c:
        yield c


def reference_text(engine, prompt: str, adapter, n: int) -> str:
    request = GenerationRequest(prompt=prompt, adapter=adapter, max_new_tokens=n, ignore_eos=True)
    return "".join(e.text for e in engine.submit(request) if isinstance(e, TokenDelta))


def test_generate_streams_text(client, server):
    text = "".join(client.generate("Prove that", adapter="math", max_new_tokens=10, ignore_eos=True))
    assert text == reference_text(server.engine, "Prove that", "math", 10)


def test_generate_events_end_with_a_completion(client):
    events = list(client.generate_events("Prove that", adapter="", max_new_tokens=5, ignore_eos=True, request_id="c1"))
    assert all(isinstance(e, TextChunk) for e in events[:-1])
    done = events[-1]
    assert isinstance(done, Completion)
    assert (done.finish_reason, done.adapter, done.completion_tokens, done.request_id) == ("length", "", 5, "c1")
    assert sum(len(e.token_ids) for e in events[:-1]) == 5


def test_breaking_off_cancels_the_generation(client, server):
    events = client.generate_events("Prove", max_new_tokens=2000, ignore_eos=True)
    next(events)
    events.close()  # the caller stops reading
    wait_until(lambda: server.engine.running_rows == 0, what="the abandoned row to leave the batch")
    assert server.gate.steps < 2000


def test_adapter_lifecycle(client, adapter_dirs):
    loaded = client.load_adapter("extra", str(adapter_dirs["poet"]), pinned=True)
    assert loaded.adapter.name == "extra" and loaded.adapter.pinned and not loaded.already_loaded
    assert client.load_adapter("extra", str(adapter_dirs["poet"])).already_loaded
    assert [a.name for a in client.list_adapters(page_size=1)] == ["extra", "math", "poet"]
    assert client.get_adapter("extra").rank == 8
    changed = client.set_adapter("extra")
    assert changed.adapter.is_default and changed.previous_default_adapter == ""
    gone = client.unload_adapter("extra")
    assert gone is not None and gone.is_default
    assert client.unload_adapter("extra", allow_missing=True) is None
    assert client.health() == "SERVING" and client.health("loramux.v1.AdapterService") == "SERVING"


def test_errors_carry_decoded_details(client):
    with pytest.raises(LoramuxRpcError) as caught:
        client.get_adapter("nope")
    err = caught.value
    assert err.code is grpc.StatusCode.NOT_FOUND and err.reason == "ADAPTER_NOT_FOUND"
    assert err.metadata["adapter"] == "nope" and err.metadata["requestId"]
    with pytest.raises(LoramuxRpcError) as caught:
        list(client.generate("hi", top_p=2.0))
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert [f for f, _ in caught.value.field_violations] == ["sampling.top_p"]
    assert str(caught.value).startswith("INVALID_ARGUMENT INVALID_ARGUMENT: ")
