"""The gRPC contract (protos/loramux/v1) and its committed Python stubs (clients/loramux/v1).

* Freshness: the stubs are regenerated into a temporary folder with the same protoc invocation as `make proto`;
  any committed stub that differs, is missing or is left over fails the test, named (fix: `make proto`, commit).
* Versions: the generated modules import with the installed protobuf and grpcio (the gencode's versions are
  checked explicitly, so a too-new grpcio-tools fails with a clear message).
* Contract: services, RPC shapes, every message's fields (number, type, optional/oneof/repeated) and enums are
  pinned here, so any wire change is deliberate; enums start at *_UNSPECIFIED = 0; no secret travels as a field;
  every element of the .proto files carries a comment.
* Smoke: an in-process server built from the generated servicer classes answers through the generated stubs.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import google.protobuf
import grpc
import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
STUB_DIR = ROOT / "clients" / "loramux" / "v1"
PROTO_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "protos" / "loramux" / "v1").glob("*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
MODULES = [
    "loramux.v1.adapter_service_pb2",
    "loramux.v1.adapter_service_pb2_grpc",
    "loramux.v1.generation_service_pb2",
    "loramux.v1.generation_service_pb2_grpc",
]


def run_protoc(*args: str) -> None:
    """grpc_tools.protoc from the repo root, exactly as the Makefile's `proto` target calls it."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", *args, *PROTO_FILES]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"protoc failed: {' '.join(cmd)}\n{done.stderr}"


@pytest.fixture(scope="module")
def fresh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    run_protoc(f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}")
    return out


@pytest.fixture(scope="module")
def files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The .proto files as compiled into the committed stubs, by file name."""
    out = {}
    for name in MODULES[0::2]:
        proto = descriptor_pb2.FileDescriptorProto.FromString(importlib.import_module(name).DESCRIPTOR.serialized_pb)
        out[Path(proto.name).name] = proto
    return out


# ------------------------------------------------------------------------------------------------ freshness


def test_proto_files_present() -> None:
    assert PROTO_FILES == ["protos/loramux/v1/adapter_service.proto", "protos/loramux/v1/generation_service.proto"]


def test_committed_stubs_are_fresh(fresh_dir: Path) -> None:
    produced = sorted(p.relative_to(fresh_dir).as_posix() for p in fresh_dir.rglob("*") if p.is_file())
    assert all(p.startswith("loramux/v1/") for p in produced), f"protoc wrote outside loramux/v1/: {produced}"
    generated = {Path(p).name: (fresh_dir / p).read_bytes() for p in produced}
    committed = {p.name: p.read_bytes() for p in STUB_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    problems = [f"missing: {n}" for n in sorted(generated.keys() - committed.keys())]
    problems += [f"left over (no .proto makes it): {n}" for n in sorted(committed.keys() - generated.keys())]
    problems += [f"stale: {n}" for n in sorted(generated.keys() & committed.keys()) if generated[n] != committed[n]]
    assert not problems, "clients/loramux/v1 is out of date; run `make proto` and commit:\n" + "\n".join(problems)


def test_loramux_is_one_namespace_and_the_stubs_a_regular_package() -> None:
    import loramux
    import loramux.v1

    assert getattr(loramux, "__file__", None) is None  # PEP 420: shared by the server and client distributions
    assert loramux.v1.__file__ == str(STUB_DIR / "__init__.py")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("module", MODULES)
def test_generated_module_imports_with_installed_runtime(module: str) -> None:
    importlib.import_module(module)  # runs protobuf's ValidateProtobufRuntimeVersion / grpcio's version check
    source = (STUB_DIR / (module.rpartition(".")[2] + ".py")).read_text()
    if module.endswith("_grpc"):
        made_for = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", source)
        assert made_for, "no GRPC_GENERATED_VERSION in the gencode"
        assert _version(made_for[1]) <= _version(grpc.__version__), (
            f"{module} needs grpcio>={made_for[1]}, installed {grpc.__version__}: align grpcio-tools with grpcio"
        )
    else:
        made_for = re.search(r"# Protobuf Python Version: (\S+)", source)
        assert made_for, "no protobuf gencode version header"
        gencode, runtime = _version(made_for[1]), _version(google.protobuf.__version__)
        assert gencode[0] == runtime[0] and gencode <= runtime, (
            f"{module} is protobuf {made_for[1]} gencode; runtime is {google.protobuf.__version__}: "
            "gencode must be the runtime's major version and not newer (pin grpcio-tools accordingly)"
        )


# ------------------------------------------------------------------------------------------------ contract

UNARY, SERVER_STREAMING = "unary", "server-streaming"

SERVICES = {
    "AdapterService": {
        "LoadAdapter": ("LoadAdapterRequest", "LoadAdapterResponse", UNARY),
        "UnloadAdapter": ("UnloadAdapterRequest", "UnloadAdapterResponse", UNARY),
        "SetAdapter": ("SetAdapterRequest", "SetAdapterResponse", UNARY),
        "GetAdapter": ("GetAdapterRequest", "GetAdapterResponse", UNARY),
        "ListAdapters": ("ListAdaptersRequest", "ListAdaptersResponse", UNARY),
    },
    "GenerationService": {
        "Generate": ("GenerateRequest", "GenerateResponse", SERVER_STREAMING),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", UNARY),
    },
}

# field -> "number [optional|repeated|oneof <name>] type"; types of this package without the package prefix.
MESSAGES = {
    "Adapter": {
        "name": "1 string",
        "source": "2 string",
        "source_kind": "3 AdapterSourceKind",
        "subfolder": "4 string",
        "revision": "5 string",
        "resolved_revision": "6 string",
        "rank": "7 uint32",
        "alpha": "8 float",
        "target_modules": "9 repeated string",
        "num_modules": "10 uint32",
        "dtype": "11 string",
        "size_bytes": "12 uint64",
        "is_default": "13 bool",
        "pinned": "14 bool",
        "version": "15 uint32",
        "loaded_at": "16 google.protobuf.Timestamp",
        "last_used": "17 google.protobuf.Timestamp",
        "state": "18 AdapterState",
        "requests_served": "19 uint64",
        "on_demand": "20 bool",
    },
    "LoadAdapterRequest": {
        "name": "1 string",
        "source": "2 string",
        "revision": "3 string",
        "subfolder": "4 string",
        "replace": "5 bool",
        "pinned": "6 bool",
        "autocast_adapter_dtype": "7 optional bool",
    },
    "LoadAdapterResponse": {
        "adapter": "1 Adapter",
        "already_loaded": "2 bool",
        "missing_keys": "3 repeated string",
        "unexpected_keys": "4 repeated string",
    },
    "UnloadAdapterRequest": {"name": "1 string", "allow_missing": "2 bool"},
    "UnloadAdapterResponse": {"adapter": "1 Adapter"},
    "SetAdapterRequest": {"name": "1 string"},
    "SetAdapterResponse": {"adapter": "1 Adapter", "previous_default_adapter": "2 string"},
    "GetAdapterRequest": {"name": "1 string"},
    "GetAdapterResponse": {"adapter": "1 Adapter"},
    "ListAdaptersRequest": {"page_size": "1 int32", "page_token": "2 string"},
    "ListAdaptersResponse": {
        "adapters": "1 repeated Adapter",
        "next_page_token": "2 string",
        "default_adapter": "3 string",
    },
    "GenerateRequest": {
        "text": "1 oneof input string",
        "token_ids": "2 oneof input TokenIds",
        "adapter": "3 optional string",
        "sampling": "4 SamplingParams",
        "stopping": "5 StoppingCriteria",
        "request_id": "6 string",
        "apply_chat_template": "7 bool",
        "messages": "8 oneof input ChatMessages",
        "adapter_mix": "9 repeated AdapterWeight",
        "logprobs": "10 bool",
        "top_logprobs": "11 uint32",
        "prompt_logprobs": "12 bool",
    },
    "ChatMessages": {"messages": "1 repeated ChatMessage"},
    "ChatMessage": {"role": "1 string", "content": "2 string"},
    "AdapterWeight": {"name": "1 string", "weight": "2 float"},
    "TokenizeRequest": {
        "text": "1 oneof input string",
        "messages": "2 oneof input ChatMessages",
        "apply_chat_template": "3 bool",
    },
    "TokenizeResponse": {"token_ids": "1 repeated uint32", "count": "2 uint32"},
    "TokenLogprob": {"token_id": "1 uint32", "logprob": "2 float", "top": "3 repeated TopLogprob"},
    "TopLogprob": {"token_id": "1 uint32", "logprob": "2 float"},
    "MixMember": {"name": "1 string", "version": "2 uint32", "weight": "3 float"},
    "GenerateResponse": {
        "chunk": "1 oneof event TokenChunk",
        "finished": "2 oneof event GenerationFinished",
    },
    "TokenIds": {"ids": "1 repeated uint32"},
    "SamplingParams": {
        "temperature": "1 optional float",
        "top_p": "2 optional float",
        "top_k": "3 optional uint32",
        "seed": "4 optional uint64",
        "repetition_penalty": "5 optional float",
        "presence_penalty": "6 optional float",
        "frequency_penalty": "7 optional float",
        "min_p": "8 optional float",
        "typical_p": "9 optional float",
    },
    "StoppingCriteria": {
        "max_new_tokens": "1 optional uint32",
        "stop": "2 repeated string",
        "ignore_eos": "3 bool",
        "min_new_tokens": "4 uint32",
        "stop_token_ids": "5 repeated uint32",
    },
    "TokenChunk": {"text": "1 string", "token_ids": "2 repeated uint32", "logprobs": "3 repeated TokenLogprob"},
    "GenerationFinished": {
        "finish_reason": "1 FinishReason",
        "usage": "2 Usage",
        "adapter": "3 string",
        "adapter_version": "4 uint32",
        "stop_sequence": "5 string",
        "seed": "6 optional uint64",
        "stop_token_id": "7 optional uint32",
        "prompt_logprobs": "8 repeated TokenLogprob",
        "adapter_mix": "9 repeated MixMember",
    },
    "Usage": {"prompt_tokens": "1 uint32", "completion_tokens": "2 uint32", "cached_prompt_tokens": "3 uint32"},
}

ENUMS = {
    "AdapterSourceKind": ["ADAPTER_SOURCE_KIND_UNSPECIFIED", "ADAPTER_SOURCE_KIND_LOCAL", "ADAPTER_SOURCE_KIND_HUB"],
    "AdapterState": [
        "ADAPTER_STATE_UNSPECIFIED",
        "ADAPTER_STATE_RESIDENT",
        "ADAPTER_STATE_LOADING",
        "ADAPTER_STATE_NOT_RESIDENT",
    ],
    "FinishReason": [
        "FINISH_REASON_UNSPECIFIED",
        "FINISH_REASON_EOS",
        "FINISH_REASON_STOP_SEQUENCE",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_STOP_TOKEN",
    ],
}

FDP = descriptor_pb2.FieldDescriptorProto


def describe_field(message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
        kind = field.type_name.removeprefix(".").removeprefix("loramux.v1.")
    else:
        kind = FDP.Type.Name(field.type).removeprefix("TYPE_").lower()
    if field.proto3_optional:
        return f"{field.number} optional {kind}"
    if field.label == FDP.LABEL_REPEATED:
        return f"{field.number} repeated {kind}"
    if field.HasField("oneof_index"):
        return f"{field.number} oneof {message.oneof_decl[field.oneof_index].name} {kind}"
    return f"{field.number} {kind}"


def all_messages(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> dict[str, descriptor_pb2.DescriptorProto]:
    return {m.name: m for f in files.values() for m in f.message_type}


def test_files_share_the_package(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    assert sorted(files) == ["adapter_service.proto", "generation_service.proto"]
    for proto in files.values():
        assert proto.package == "loramux.v1"
        assert proto.syntax == "proto3"
    assert list(files["adapter_service.proto"].dependency) == ["google/protobuf/timestamp.proto"]
    assert list(files["generation_service.proto"].dependency) == []


def test_services(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    actual = {}
    for proto in files.values():
        for service in proto.service:
            actual[service.name] = {
                m.name: (
                    m.input_type.removeprefix(".loramux.v1."),
                    m.output_type.removeprefix(".loramux.v1."),
                    SERVER_STREAMING if m.server_streaming else UNARY,
                )
                for m in service.method
                if not m.client_streaming
            }
            assert len(actual[service.name]) == len(service.method), "no client streaming in this API"
    assert actual == SERVICES
    # One request and one response message per RPC, each named after it.
    for methods in SERVICES.values():
        for rpc, (request, response, _) in methods.items():
            assert (request, response) == (f"{rpc}Request", f"{rpc}Response")


def test_health_service_names_are_the_full_service_names() -> None:
    from loramux.v1 import adapter_service_pb2, generation_service_pb2

    assert adapter_service_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name == "loramux.v1.AdapterService"
    generation = generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"]
    assert generation.full_name == "loramux.v1.GenerationService"


def test_message_set(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    assert sorted(all_messages(files)) == sorted(MESSAGES)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_fields(files: dict[str, descriptor_pb2.FileDescriptorProto], name: str) -> None:
    message = all_messages(files)[name]
    assert not message.nested_type and not message.enum_type, "keep messages flat"
    assert {f.name: describe_field(message, f) for f in message.field} == MESSAGES[name]


def test_enums(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    actual = {e.name: e for f in files.values() for e in f.enum_type}
    assert sorted(actual) == sorted(ENUMS)
    for name, values in ENUMS.items():
        assert [(v.name, v.number) for v in actual[name].value] == [(v, i) for i, v in enumerate(values)]


def test_oneofs_and_presence_behave_as_documented() -> None:
    from loramux.v1 import generation_service_pb2 as gen

    request = gen.GenerateRequest(text="hi")
    assert request.WhichOneof("input") == "text"
    request.token_ids.ids.extend([1, 2])
    assert request.WhichOneof("input") == "token_ids" and not request.text
    # adapter: unset (server default) and "" (bare base model) are distinguishable.
    assert not gen.GenerateRequest().HasField("adapter")
    assert gen.GenerateRequest(adapter="").HasField("adapter")
    assert not gen.SamplingParams().HasField("temperature")
    assert gen.SamplingParams(temperature=0.0).HasField("temperature")
    assert not gen.StoppingCriteria().HasField("max_new_tokens")
    assert gen.GenerateResponse(finished=gen.GenerationFinished()).WhichOneof("event") == "finished"
    assert gen.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"


def test_no_secret_travels_as_a_field(files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    secret = re.compile(r"^(\w+_)?(token|password|secret|api_key|credentials?)$")
    pagination = {"page_token", "next_page_token"}
    names = [f"{m.name}.{f.name}" for m in all_messages(files).values() for f in m.field if f.name not in pagination]
    fields = [name for name in names if secret.search(name.rpartition(".")[2])]
    assert fields == [], "the Hub token comes from server configuration, never from a request"


# Paths into FileDescriptorProto (see descriptor.proto): message_type=4, enum_type=5, service=6;
# DescriptorProto field=2, nested_type=3, enum_type=4, oneof_decl=8; EnumDescriptorProto value=2;
# ServiceDescriptorProto method=2.
def documentable(proto: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[tuple[int, ...], str]]:
    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str) -> Iterator:
        yield path, f"message {prefix}{m.name}"
        for i, f in enumerate(m.field):
            yield (*path, 2, i), f"field {prefix}{m.name}.{f.name}"
        synthetic = {f.oneof_index for f in m.field if f.proto3_optional}
        for i, o in enumerate(m.oneof_decl):
            if i not in synthetic:
                yield (*path, 8, i), f"oneof {prefix}{m.name}.{o.name}"
        for i, nested in enumerate(m.nested_type):
            yield from message((*path, 3, i), nested, f"{prefix}{m.name}.")
        for i, e in enumerate(m.enum_type):
            yield from enum((*path, 4, i), e, f"{prefix}{m.name}.")

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str) -> Iterator:
        yield path, f"enum {prefix}{e.name}"
        for i, v in enumerate(e.value):
            yield (*path, 2, i), f"enum value {prefix}{e.name}.{v.name}"

    for i, s in enumerate(proto.service):
        yield (6, i), f"service {s.name}"
        for j, rpc in enumerate(s.method):
            yield (6, i, 2, j), f"rpc {s.name}.{rpc.name}"
    for i, m in enumerate(proto.message_type):
        yield from message((4, i), m, "")
    for i, e in enumerate(proto.enum_type):
        yield from enum((5, i), e, "")


def test_every_element_is_documented(tmp_path: Path) -> None:
    out = tmp_path / "contract.binpb"
    run_protoc("--include_source_info", f"--descriptor_set_out={out}")
    undocumented = []
    for proto in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in proto.source_code_info.location}
        undocumented += [f"{proto.name}: {what}" for path, what in documentable(proto) if not comments.get(path)]
    assert undocumented == []


def test_buf_lint() -> None:
    buf = shutil.which("buf") or shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.skip("buf is not installed (`make proto-lint` installs it into the venv)")
    done = subprocess.run([buf, "lint", "protos"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ smoke


def test_stubs_round_trip_through_an_in_process_server() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    from loramux.v1 import (
        adapter_service_pb2,
        adapter_service_pb2_grpc,
        generation_service_pb2,
        generation_service_pb2_grpc,
    )

    class Adapters(adapter_service_pb2_grpc.AdapterServiceServicer):
        def GetAdapter(self, request, context):
            adapter = adapter_service_pb2.Adapter(
                name=request.name,
                source_kind=adapter_service_pb2.ADAPTER_SOURCE_KIND_HUB,
                target_modules=["q_proj", "v_proj"],
                loaded_at=Timestamp(seconds=1_700_000_000),
            )
            return adapter_service_pb2.GetAdapterResponse(adapter=adapter)

    class Generation(generation_service_pb2_grpc.GenerationServiceServicer):
        def Generate(self, request, context):
            context.send_initial_metadata((("x-request-id", request.request_id),))
            for piece in ("Hel", "lo"):
                yield generation_service_pb2.GenerateResponse(
                    chunk=generation_service_pb2.TokenChunk(text=piece, token_ids=[len(piece)])
                )
            yield generation_service_pb2.GenerateResponse(
                finished=generation_service_pb2.GenerationFinished(
                    finish_reason=generation_service_pb2.FINISH_REASON_LENGTH,
                    usage=generation_service_pb2.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=2),
                    adapter=request.adapter if request.HasField("adapter") else "default-one",
                )
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    adapter_service_pb2_grpc.add_AdapterServiceServicer_to_server(Adapters(), server)
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(Generation(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            adapters = adapter_service_pb2_grpc.AdapterServiceStub(channel)
            got = adapters.GetAdapter(adapter_service_pb2.GetAdapterRequest(name="sql"), timeout=10).adapter
            assert (got.name, list(got.target_modules)) == ("sql", ["q_proj", "v_proj"])
            assert got.loaded_at.seconds == 1_700_000_000
            assert not got.HasField("last_used")
            with pytest.raises(grpc.RpcError) as unimplemented:
                adapters.ListAdapters(adapter_service_pb2.ListAdaptersRequest(), timeout=10)
            assert unimplemented.value.code() is grpc.StatusCode.UNIMPLEMENTED

            generation = generation_service_pb2_grpc.GenerationServiceStub(channel)
            request = generation_service_pb2.GenerateRequest(
                token_ids=generation_service_pb2.TokenIds(ids=[1, 2, 3]), request_id="req-1"
            )
            call = generation.Generate(request, timeout=10)
            events = list(call)
            assert dict(call.initial_metadata())["x-request-id"] == "req-1"
            assert [e.WhichOneof("event") for e in events] == ["chunk", "chunk", "finished"]
            assert "".join(e.chunk.text for e in events[:-1]) == "Hello"
            finished = events[-1].finished
            assert finished.usage.prompt_tokens == 3 and finished.adapter == "default-one"
            assert finished.finish_reason == generation_service_pb2.FINISH_REASON_LENGTH
    finally:
        server.stop(None)
