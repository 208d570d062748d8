"""Bearer-token authorization: roles per RPC, rich UNAUTHENTICATED / PERMISSION_DENIED, open health and reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from loramux.client import LoramuxClient, LoramuxRpcError
from loramux.service import __main__ as service_main
from loramux.service.auth import BearerTokens, Role, parse_tokens
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb
from tests.service.harness import expect_failure

ADMIN, USER = "admin-token-1", "generate-token-2"
TOKENS = parse_tokens(f"# roles\nadmin {ADMIN}\n\ngenerate {USER}\n")
Code = grpc.StatusCode


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("x-request-id", "auth-test"))


@pytest.fixture
def secured(make_server):
    return make_server(auth_tokens=TOKENS)


def test_missing_or_unknown_token_is_unauthenticated(secured) -> None:
    request = apb.ListAdaptersRequest()
    for metadata in [(), bearer("nope"), (("authorization", f"Basic {ADMIN}"),), (("authorization", "Bearer "),)]:
        failure = expect_failure(secured.adapters.ListAdapters, request, metadata=metadata, timeout=5)
        assert failure.code is Code.UNAUTHENTICATED
        assert failure.info.reason == "UNAUTHENTICATED"
        assert "Bearer" in failure.message or "not valid" in failure.message
        assert ADMIN not in failure.message and USER not in failure.message


def test_generate_role_reads_and_generates_but_cannot_change_adapters(secured, adapter_dirs) -> None:
    names = [a.name for a in secured.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=bearer(USER)).adapters]
    assert names == ["math", "poet"]
    request = gpb.GenerateRequest(text="Prove", stopping=gpb.StoppingCriteria(max_new_tokens=3, ignore_eos=True))
    responses = list(secured.generation.Generate(request, metadata=bearer(USER), timeout=30))
    assert responses[-1].finished.usage.completion_tokens == 3

    load = apb.LoadAdapterRequest(name="third", source=str(adapter_dirs["math"]))
    for method, req in [
        (secured.adapters.LoadAdapter, load),
        (secured.adapters.SetAdapter, apb.SetAdapterRequest(name="math")),
        (secured.adapters.UnloadAdapter, apb.UnloadAdapterRequest(name="poet")),
    ]:
        failure = expect_failure(method, req, metadata=bearer(USER), timeout=5)
        assert failure.code is Code.PERMISSION_DENIED and failure.info.reason == "PERMISSION_DENIED"
        assert failure.info.metadata["requestId"] == "auth-test"
        assert "generate" in failure.message
    manager = secured.engine.manager  # nothing changed
    assert [a.name for a in manager.list_adapters()] == ["math", "poet"] and manager.default_adapter is None


def test_admin_role_may_change_adapters(secured, adapter_dirs) -> None:
    load = apb.LoadAdapterRequest(name="third", source=str(adapter_dirs["math"]))
    assert secured.adapters.LoadAdapter(load, metadata=bearer(ADMIN), timeout=30).adapter.name == "third"
    secured.adapters.SetAdapter(apb.SetAdapterRequest(name="third"), metadata=bearer(ADMIN), timeout=5)


def test_streaming_refusal_is_logged_once_with_its_status(secured, caplog) -> None:
    caplog.set_level("INFO", logger="loramux.access")
    failure = expect_failure(secured.generation.Generate, gpb.GenerateRequest(text="x"), metadata=(), timeout=5)
    assert failure.code is Code.UNAUTHENTICATED
    lines = [r.getMessage() for r in caplog.records if "rpc=Generate" in r.getMessage()]
    assert len(lines) == 1 and "status=UNAUTHENTICATED" in lines[0]
    assert secured.engine.running_rows == 0 and secured.engine.queued == 0


def test_health_and_reflection_need_no_token(secured) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert secured.health_status("loramux.v1.GenerationService") == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(secured.channel)
    listing = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "loramux.v1.GenerationService" in {s.name for s in listing.list_services_response.service}


def test_python_client_sends_its_token(secured) -> None:
    with LoramuxClient(secured.target, timeout=10, token=USER) as client:
        assert [a.name for a in client.list_adapters()] == ["math", "poet"]
        with pytest.raises(LoramuxRpcError) as caught:
            client.set_adapter("math")
    assert caught.value.code is Code.PERMISSION_DENIED
    with LoramuxClient(secured.target, timeout=10) as client, pytest.raises(LoramuxRpcError) as caught:
        client.list_adapters()
    assert caught.value.code is Code.UNAUTHENTICATED


def test_without_tokens_every_call_is_open(server) -> None:
    assert server.adapters.ListAdapters(apb.ListAdaptersRequest(), timeout=5).adapters


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("admin", "expected `ROLE TOKEN`"),
        ("root abc", "unknown role 'root'"),
        ("admin abc\ngenerate abc", "line 2: this token is listed twice"),
        ("# nothing\n\n", "lists no tokens"),
    ],
)
def test_bad_token_files_are_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_tokens(text)
    assert "abc" not in str(caught.value)


def test_tokens_never_appear_in_reprs() -> None:
    assert ADMIN not in repr(TOKENS) and USER not in repr(TOKENS)
    assert dict(TOKENS.roles) == {ADMIN: Role.ADMIN, USER: Role.GENERATE}


def test_flag_reads_the_token_file(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"admin {ADMIN}\n")
    args = service_main.build_parser().parse_args(["--model", str(tmp_path), "--auth-tokens-file", str(path)])
    config = service_main.config_from_args(args, {})
    assert isinstance(config.auth_tokens, BearerTokens) and ADMIN not in repr(config)
    missing = service_main.build_parser().parse_args(["--model", "x", "--auth-tokens-file", str(tmp_path / "no")])
    with pytest.raises(ValueError, match="--auth-tokens-file: cannot read"):
        service_main.config_from_args(missing, {})
