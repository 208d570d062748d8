"""The routing metadata (service/routing.py): x-loramux-adapter must agree with the body, x-loramux-replica names
the replica in every response (initial metadata on success, the trailer on errors), and --replica-id."""

from __future__ import annotations

import grpc
import pytest

from loramux.service import __main__ as service_main
from loramux.service.server import default_replica_id
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb
from tests.service.harness import expect_failure, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Code = grpc.StatusCode
ADAPTER_KEY, REPLICA_KEY = "x-loramux-adapter", "x-loramux-replica"


def request(**fields) -> gpb.GenerateRequest:
    return gpb.GenerateRequest(text="Prove that", stopping=gpb.StoppingCriteria(max_new_tokens=2), **fields)


def generate(server, header: str | None, **fields) -> gpb.GenerationFinished:
    metadata = ((ADAPTER_KEY, header),) if header is not None else ()
    responses = list(server.generation.Generate(request(**fields), metadata=metadata, timeout=30))
    return responses[-1].finished


def mismatch(server, header: str, **fields):
    call = server.generation.Generate(request(**fields), metadata=((ADAPTER_KEY, header),), timeout=30)
    failure = expect_failure(list, call)
    assert failure.code is Code.INVALID_ARGUMENT and failure.info.reason == "ADAPTER_METADATA_MISMATCH"
    assert failure.fields == [ADAPTER_KEY] and ADAPTER_KEY in failure.message
    assert failure.info.metadata["metadataKey"] == ADAPTER_KEY and failure.info.metadata["metadataValue"] == header
    return failure


MIX = [gpb.AdapterWeight(name="math", weight=0.5), gpb.AdapterWeight(name="poet", weight=0.5)]


@pytest.mark.parametrize(
    ("header", "fields"),
    [
        (None, {"adapter": "math"}),  # no header: nothing to check (a direct caller, an old client)
        ("math", {"adapter": "math"}),
        ("", {"adapter": ""}),  # the bare base model
        ("math", {"adapter_mix": MIX}),  # a mix routes by its first member
        (None, {}),  # the replica's default (here the base model)
        ("", {}),
    ],
)
def test_agreeing_or_absent_header_is_served(server, header, fields):
    finished = generate(server, header, **fields)
    assert finished.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("header", "fields", "expected"),
    [
        ("poet", {"adapter": "math"}, "math"),
        ("math", {"adapter": ""}, ""),
        ("", {"adapter": "math"}, "math"),
        ("poet", {"adapter_mix": MIX}, "math"),
        ("math", {}, ""),  # the default is the base model
    ],
)
def test_disagreeing_header_is_invalid_argument(server, header, fields, expected):
    failure = mismatch(server, header, **fields)
    assert failure.info.metadata["expected"] == expected
    wait_until(lambda: server.engine.running_rows == 0, what="no row left running")


def test_header_for_a_request_naming_no_adapter_must_be_the_default(server):
    server.adapters.SetAdapter(apb.SetAdapterRequest(name="math"), timeout=10)
    assert generate(server, "math").adapter == "math"
    assert generate(server, None).adapter == "math"
    failure = mismatch(server, "poet")
    assert failure.info.metadata["expected"] == "math" and failure.info.metadata["adapter"] == "math"
    wait_until(lambda: server.engine.running_rows == 0, what="the admitted row to be freed")


def test_every_value_of_a_repeated_header_is_checked(server):
    metadata = ((ADAPTER_KEY, "math"), (ADAPTER_KEY, "poet"))
    call = server.generation.Generate(request(adapter="math"), metadata=metadata, timeout=30)
    assert expect_failure(list, call).info.reason == "ADAPTER_METADATA_MISMATCH"


def test_replica_defaults_to_the_bound_address(server):
    call = server.generation.Generate(request(adapter="math"), timeout=30)
    list(call)
    assert dict(call.initial_metadata())[REPLICA_KEY] == server.target  # 127.0.0.1:<the port bound>
    _, unary = server.adapters.ListAdapters.with_call(apb.ListAdaptersRequest(), timeout=10)
    assert dict(unary.initial_metadata())[REPLICA_KEY] == server.target


def test_replica_id_is_in_the_trailer_of_errors(make_server):
    server = make_server(replica_id="replica-7")
    call = server.generation.Generate(request(adapter="no-such"), timeout=30)
    failure = expect_failure(list, call)
    assert failure.code is Code.NOT_FOUND and failure.trailing[REPLICA_KEY] == "replica-7"
    call = server.generation.Generate(request(adapter="math"), timeout=30)
    list(call)
    assert dict(call.initial_metadata())[REPLICA_KEY] == "replica-7"


def test_default_replica_id_of_a_wildcard_host_is_the_machine_name(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "node-3")
    assert default_replica_id("0.0.0.0", 50051) == "node-3:50051"
    assert default_replica_id("::", 50051) == "node-3:50051"
    assert default_replica_id("::1", 7) == "[::1]:7"
    assert default_replica_id("10.0.0.5", 7) == "10.0.0.5:7"


def test_replica_id_flag(tmp_path, capsys):
    parse = service_main.build_parser().parse_args
    config = service_main.config_from_args(parse(["--model", str(tmp_path), "--replica-id", "pod-a.b:1"]), {})
    assert config.replica_id == "pod-a.b:1"
    assert service_main.config_from_args(parse(["--model", str(tmp_path)]), {}).replica_id is None
    with pytest.raises(SystemExit):
        parse(["--replica-id", "no spaces"])
    assert "--replica-id" in capsys.readouterr().err
