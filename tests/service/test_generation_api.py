"""The generation API through gRPC and the clients: Tokenize, logprobs, adapter mixes, stop token ids, the new
sampling fields and their errors, and the CLI's options."""

from __future__ import annotations

import io

import grpc
import pytest

from loramux.client import LoramuxClient
from loramux.client.cli import main as cli_main
from loramux.core import GenerationRequest
from loramux.v1 import generation_service_pb2 as gpb
from tests.service.harness import expect_failure

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Code = grpc.StatusCode
PROMPT = "Prove that the sum"


def test_tokenize_counts_what_generate_sees(server):
    response = server.generation.Tokenize(gpb.TokenizeRequest(text=PROMPT), timeout=10)
    assert response.count == len(response.token_ids) > 0
    assert list(response.token_ids) == server.engine.tokenize(GenerationRequest(prompt=PROMPT))
    finished = server.generate(text=PROMPT, stopping=gpb.StoppingCriteria(max_new_tokens=1))[-1].finished
    assert finished.usage.prompt_tokens == response.count
    failure = expect_failure(server.generation.Tokenize, gpb.TokenizeRequest(), timeout=10)
    assert failure.code is Code.INVALID_ARGUMENT and failure.fields == ["input"]
    huge = expect_failure(server.generation.Tokenize, gpb.TokenizeRequest(text="x" * (4 << 20)), timeout=10)
    assert huge.code is Code.RESOURCE_EXHAUSTED


def test_logprobs_mix_and_stop_tokens_through_grpc(server):
    request = gpb.GenerateRequest(
        text=PROMPT,
        adapter_mix=[gpb.AdapterWeight(name="math", weight=0.5), gpb.AdapterWeight(name="poet", weight=0.5)],
        logprobs=True,
        top_logprobs=2,
        prompt_logprobs=True,
        stopping=gpb.StoppingCriteria(max_new_tokens=5, ignore_eos=True),
    )
    responses = server.generation.Generate(request, timeout=30)
    responses = list(responses)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    ids = [t for c in chunks for t in c.token_ids]
    entries = [lp for c in chunks for lp in c.logprobs]
    assert [e.token_id for e in entries] == ids and all(len(e.top) == 2 and e.logprob <= 0 for e in entries)
    finished = responses[-1].finished
    assert finished.adapter == "" and [m.name for m in finished.adapter_mix] == ["math", "poet"]
    assert len(finished.prompt_logprobs) == finished.usage.prompt_tokens - 1
    stop = ids[2]
    stopped = server.generate(
        text=PROMPT,
        adapter_mix=request.adapter_mix,
        stopping=gpb.StoppingCriteria(max_new_tokens=5, ignore_eos=True, stop_token_ids=[stop]),
    )[-1].finished
    assert stopped.finish_reason == gpb.FINISH_REASON_STOP_TOKEN and stopped.stop_token_id == stop


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"adapter": "math", "adapter_mix": [gpb.AdapterWeight(name="poet", weight=1.0)]}, "adapter_mix"),
        ({"adapter_mix": [gpb.AdapterWeight(name="poet", weight=1.0)]}, "adapter_mix"),
        ({"adapter_mix": [gpb.AdapterWeight(name="a/../b", weight=1.0)] * 2}, "adapter_mix"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"sampling": gpb.SamplingParams(presence_penalty=3.0)}, "sampling.presence_penalty"),
        ({"sampling": gpb.SamplingParams(min_p=-0.5)}, "sampling.min_p"),
        ({"stopping": gpb.StoppingCriteria(max_new_tokens=2, min_new_tokens=3)}, "stopping.min_new_tokens"),
        ({"stopping": gpb.StoppingCriteria(stop_token_ids=[99_999])}, "stopping.stop_token_ids"),
        ({"messages": gpb.ChatMessages(messages=[gpb.ChatMessage(role="user", content="hi")])}, "messages"),
    ],
)
def test_invalid_generation_options_name_their_field(server, fields, field):
    failure = expect_failure(server.generation.Generate, gpb.GenerateRequest(text=PROMPT, **fields), timeout=30)
    assert failure.code is Code.INVALID_ARGUMENT and failure.fields == [field]


def test_an_unknown_mix_member_is_not_found(server):
    mix = [gpb.AdapterWeight(name="math", weight=1.0), gpb.AdapterWeight(name="ghost", weight=1.0)]
    failure = expect_failure(server.generation.Generate, gpb.GenerateRequest(text=PROMPT, adapter_mix=mix), timeout=30)
    assert failure.code is Code.NOT_FOUND and failure.info.reason == "ADAPTER_NOT_FOUND"


def test_the_python_client_and_the_cli_expose_it(server):
    with LoramuxClient(server.target, timeout=30) as client:
        assert client.tokenize(PROMPT) == server.engine.tokenize(GenerationRequest(prompt=PROMPT))
        events = list(
            client.generate_events(
                PROMPT,
                adapter_mix={"math": 0.7, "poet": 0.3},
                logprobs=True,
                top_logprobs=3,
                max_new_tokens=4,
                ignore_eos=True,
                min_new_tokens=4,
                presence_penalty=0.5,
                frequency_penalty=0.2,
            )
        )
        done = events[-1]
        assert [m.name for m in done.adapter_mix] == ["math", "poet"] and done.completion_tokens == 4
        assert all(len(lp.top) == 3 for e in events[:-1] for lp in e.logprobs)
    out, err = io.StringIO(), io.StringIO()
    argv = [
        "--target",
        server.target,
        "generate",
        "--mix",
        "math=0.7,poet=0.3",
        "--logprobs",
        "2",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        PROMPT,
    ]
    assert cli_main(argv, out=out, err=err) == 0
    assert err.getvalue().count("logprob") == 3 and "mix math=0.7,poet=0.3" in err.getvalue()
    out = io.StringIO()
    assert cli_main(["--target", server.target, "tokenize", PROMPT], out=out, err=io.StringIO()) == 0
    assert out.getvalue().startswith(f"{len(server.engine.tokenize(GenerationRequest(prompt=PROMPT)))} tokens: ")
    err = io.StringIO()
    code = cli_main(["--target", server.target, "generate", "--message", "user:hi"], out=io.StringIO(), err=err)
    assert code == 1 and "no chat template" in err.getvalue()
