"""GenerationService end to end: streaming, adapter choice per request, parity with the core engine, request
ids, every error, client cancel and deadlines (the engine row is freed), admission control."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from loramux.core import AdapterSelection, Finished, GenerationRequest
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb
from tests.generation_fixtures import collect
from tests.service.harness import expect_failure, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Code = grpc.StatusCode
PROMPT = "Prove that the sum"


def stopping(n: int, **kw) -> gpb.StoppingCriteria:
    return gpb.StoppingCriteria(max_new_tokens=n, **kw)


def streamed(responses: list[gpb.GenerateResponse]) -> tuple[list[int], str, gpb.GenerationFinished]:
    """(token ids, text, finished) of a stream, checking its shape: chunks, then exactly one finished, last."""
    assert responses and responses[-1].HasField("finished")
    assert all(r.HasField("chunk") for r in responses[:-1])
    ids = [i for r in responses[:-1] for i in r.chunk.token_ids]
    text = "".join(r.chunk.text for r in responses[:-1])
    return ids, text, responses[-1].finished


def engine_output(engine, prompt, adapter, n: int) -> tuple[list[int], str, Finished]:
    """The same request straight through the core engine (sync channel), as the reference."""
    return collect(engine.submit(GenerationRequest(prompt=prompt, adapter=adapter, max_new_tokens=n, ignore_eos=True)))


def test_greedy_stream_equals_core_engine_for_each_adapter_choice(server):
    server.adapters.SetAdapter(apb.SetAdapterRequest(name="poet"))
    outputs = {}
    for label, adapter_field, core_choice, used in [
        ("math", {"adapter": "math"}, "math", "math"),
        ("default", {}, AdapterSelection.DEFAULT, "poet"),
        ("base", {"adapter": ""}, AdapterSelection.BASE, ""),
    ]:
        responses = server.generate(text=PROMPT, stopping=stopping(12, ignore_eos=True), **adapter_field)
        ids, text, finished = streamed(responses)
        ref_ids, ref_text, ref_finished = engine_output(server.engine, PROMPT, core_choice, 12)
        assert (ids, text) == (ref_ids, ref_text), label
        assert finished.finish_reason == gpb.FINISH_REASON_LENGTH and finished.adapter == used
        assert finished.usage.prompt_tokens == ref_finished.prompt_tokens
        assert finished.usage.completion_tokens == 12 and not finished.HasField("seed")
        assert finished.adapter_version == (1 if used else 0)
        outputs[label] = ids
    assert outputs["math"] != outputs["base"] and outputs["default"] != outputs["base"]  # adapters matter


def test_token_id_prompt_and_sampling_seed(server, tokenizer):
    prompt = tokenizer(PROMPT)["input_ids"]
    by_text = streamed(server.generate(text=PROMPT, adapter="math", stopping=stopping(6, ignore_eos=True)))
    by_ids = streamed(
        server.generate(token_ids=gpb.TokenIds(ids=prompt), adapter="math", stopping=stopping(6, ignore_eos=True))
    )
    assert by_ids[0] == by_text[0]
    sampling = gpb.SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    first = streamed(server.generate(text=PROMPT, sampling=sampling, stopping=stopping(8, ignore_eos=True)))
    again = streamed(server.generate(text=PROMPT, sampling=sampling, stopping=stopping(8, ignore_eos=True)))
    assert first[0] == again[0] and first[2].seed == 1234


def test_request_id_echoed_in_initial_metadata(server):
    request = gpb.GenerateRequest(text=PROMPT, request_id="from-field", stopping=stopping(2))
    call = server.generation.Generate(request, metadata=(("x-request-id", "from-metadata"),))
    list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "from-field"
    request = gpb.GenerateRequest(text=PROMPT, stopping=stopping(2))
    call = server.generation.Generate(request, metadata=(("x-request-id", "from-md"),))
    list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "from-md"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "input"),
        ({"text": ""}, "input"),
        ({"token_ids": gpb.TokenIds(ids=[])}, "input"),
        ({"token_ids": gpb.TokenIds(ids=[1, 99999])}, "token_ids"),
        ({"token_ids": gpb.TokenIds(ids=[1]), "apply_chat_template": True}, "apply_chat_template"),
        ({"text": "hi", "apply_chat_template": True}, "apply_chat_template"),  # the tokenizer has no template
        ({"text": "hi", "adapter": "bad name"}, "adapter"),
        ({"text": "hi", "request_id": "no spaces allowed"}, "request_id"),
        ({"text": "hi", "sampling": gpb.SamplingParams(top_p=1.5)}, "sampling.top_p"),
        ({"text": "hi", "sampling": gpb.SamplingParams(temperature=-1)}, "sampling.temperature"),
        ({"text": "hi", "sampling": gpb.SamplingParams(repetition_penalty=0)}, "sampling.repetition_penalty"),
        ({"text": "hi", "stopping": stopping(0)}, "stopping.max_new_tokens"),
        ({"text": "hi", "stopping": stopping(100_000)}, "stopping.max_new_tokens"),
        ({"text": "hi", "stopping": gpb.StoppingCriteria(stop=["x"] * 17)}, "stopping.stop"),
        ({"text": "hi", "stopping": gpb.StoppingCriteria(stop=[""])}, "stopping.stop"),
        ({"text": "hi", "stopping": gpb.StoppingCriteria(stop=["y" * 257])}, "stopping.stop"),
    ],
)
def test_invalid_argument(server, fields, field):
    call = server.generation.Generate(gpb.GenerateRequest(**fields), metadata=(("x-request-id", "r1"),))
    failure = expect_failure(list, call)
    assert failure.code is Code.INVALID_ARGUMENT and failure.info.reason == "INVALID_ARGUMENT"
    assert failure.fields == [field]
    assert failure.trailing["x-request-id"] == "r1" == failure.info.metadata["requestId"]
    assert call.initial_metadata() in ((), None) or "x-request-id" not in dict(call.initial_metadata())


def test_unknown_adapter(server):
    failure = expect_failure(server.generate, text="hi", adapter="nope")
    assert failure.code is Code.NOT_FOUND and failure.info.reason == "ADAPTER_NOT_FOUND"
    assert failure.info.metadata["adapter"] == "nope"


def test_token_limits_are_resource_exhausted(make_server):
    h = make_server(max_prompt_tokens=4, max_total_tokens=10)
    failure = expect_failure(h.generate, token_ids=gpb.TokenIds(ids=[5] * 5))
    assert failure.code is Code.RESOURCE_EXHAUSTED and failure.info.metadata["limit"] == "maxPromptTokens"
    assert failure.info.metadata["limitValue"] == "4"
    failure = expect_failure(h.generate, token_ids=gpb.TokenIds(ids=[5] * 4), stopping=stopping(7))
    assert failure.code is Code.RESOURCE_EXHAUSTED and failure.info.metadata["limit"] == "maxTotalTokens"
    assert failure.info.metadata["limitValue"] == "10" and failure.retry is None  # retrying cannot help


def test_queue_full_is_resource_exhausted(make_server):
    h = make_server(max_batch_rows=1, max_queued=1)
    h.gate.close()
    long = gpb.GenerateRequest(text=PROMPT, stopping=stopping(5, ignore_eos=True))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(lambda: list(h.generation.Generate(long, timeout=30)))
        h.gate.held.wait(10)  # the first request holds the only batch row
        queued = pool.submit(lambda: list(h.generation.Generate(long, timeout=30)))
        wait_until(lambda: h.engine.queued == 1, what="the second request to queue")
        failure = expect_failure(h.generate, text=PROMPT)
        assert failure.code is Code.RESOURCE_EXHAUSTED and failure.info.reason == "RESOURCE_EXHAUSTED"
        assert failure.info.metadata["limit"] == "maxQueuedGenerations"
        assert failure.info.metadata["limitValue"] == "1" and failure.retry is not None
        h.gate.open()
        assert streamed(running.result(10))[2].usage.completion_tokens == 5
        assert streamed(queued.result(10))[2].usage.completion_tokens == 5


def test_engine_failure_is_internal_midstream_and_generic(server, monkeypatch):
    def broken_step(rows: int) -> None:
        raise RuntimeError("CUDA-ish failure with secret details")

    server.engine._on_step = broken_step  # the first decode step fails (after the prefill token)
    call = server.generation.Generate(gpb.GenerateRequest(text=PROMPT, stopping=stopping(8, ignore_eos=True)))
    failure = expect_failure(list, call)
    assert failure.code is Code.INTERNAL and failure.info.reason == "INTERNAL"
    assert "secret" not in failure.message and failure.info.metadata["requestId"] in failure.message
    wait_until(lambda: server.engine.running_rows == 0, what="the failed row to go")


def test_client_cancel_frees_the_engine_row(server, caplog):
    caplog.set_level("INFO", logger="loramux.access")
    call = server.generation.Generate(gpb.GenerateRequest(text=PROMPT, stopping=stopping(2000, ignore_eos=True)))
    next(call)  # the stream is running
    server.gate.close()
    server.gate.held.wait(10)
    assert server.engine.running_rows == 1
    call.cancel()
    wait_until(lambda: "status=CANCELLED" in caplog.text, what="the server to see the cancel")
    steps = server.gate.steps
    server.gate.open()
    wait_until(lambda: server.engine.running_rows == 0, what="the cancelled row to leave the batch")
    assert server.gate.steps <= steps + 1  # it left at the next step, long before 2000 tokens
    assert call.code() is Code.CANCELLED


def test_deadline_stops_generation(server, caplog):
    caplog.set_level("INFO", logger="loramux.access")
    server.gate.close()  # the prefill token streams, then the first decode step holds
    request = gpb.GenerateRequest(text=PROMPT, stopping=stopping(2000, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as caught:
        list(server.generation.Generate(request, timeout=0.5))
    assert caught.value.code() is Code.DEADLINE_EXCEEDED
    wait_until(lambda: "status=DEADLINE_EXCEEDED" in caplog.text, what="the server to see the deadline")
    server.gate.open()
    wait_until(lambda: server.engine.running_rows == 0, what="the expired row to leave the batch")
    assert server.gate.steps < 10


def test_access_log_line(server, caplog):
    caplog.set_level("INFO", logger="loramux.access")
    server.generate(text=PROMPT, adapter="math", request_id="log-me", stopping=stopping(3, ignore_eos=True))
    line = next(r.getMessage() for r in caplog.records if "request_id=log-me" in r.getMessage())
    assert "rpc=Generate" in line and "status=OK" in line and "adapter=math" in line
    assert "completion_tokens=3" in line and "prompt_tokens=" in line and "duration_ms=" in line


def test_shutting_down_refuses_new_generations(server):
    server.server.runtime.stop_accepting()
    failure = expect_failure(server.generate, text=PROMPT)
    assert failure.code is Code.UNAVAILABLE and failure.info.reason == "SHUTTING_DOWN"
    assert failure.retry is not None
