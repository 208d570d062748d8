"""AdapterService end to end: every RPC through the generated stubs, pagination, and each error with its details."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest

from loramux.core.adapters.sources import AdapterFiles, AdapterLocation, AdapterSource
from loramux.core.errors import AdapterSourceUnavailableError
from loramux.v1 import adapter_service_pb2 as apb
from tests.service.harness import expect_failure

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Code = grpc.StatusCode


def test_load_get_set_list_unload(make_server, adapter_dirs):
    h = make_server(adapters={})
    stub = h.adapters
    loaded = stub.LoadAdapter(apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["math"]), pinned=True))
    a = loaded.adapter
    assert not loaded.already_loaded and list(loaded.missing_keys) == []
    assert (a.name, a.source, a.source_kind) == ("math", str(adapter_dirs["math"]), apb.ADAPTER_SOURCE_KIND_LOCAL)
    assert (a.rank, a.alpha, a.version, a.pinned, a.is_default) == (4, 8.0, 1, True, False)
    assert {"q_proj", "v_proj", "down_proj"} <= set(a.target_modules) and a.num_modules == 14
    assert a.dtype == "float32" and a.size_bytes > 0 and a.loaded_at.seconds > 0 and not a.HasField("last_used")

    again = stub.LoadAdapter(apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["math"])))
    assert again.already_loaded and again.adapter.pinned  # an identical load changes nothing

    assert stub.GetAdapter(apb.GetAdapterRequest(name="math")).adapter.name == "math"
    stub.LoadAdapter(apb.LoadAdapterRequest(name="poet", source=str(adapter_dirs["poet"])))

    changed = stub.SetAdapter(apb.SetAdapterRequest(name="math"))
    assert changed.adapter.is_default and changed.previous_default_adapter == ""
    listing = stub.ListAdapters(apb.ListAdaptersRequest())
    assert [x.name for x in listing.adapters] == ["math", "poet"] and listing.next_page_token == ""
    assert listing.default_adapter == "math" and [x.is_default for x in listing.adapters] == [True, False]

    to_base = stub.SetAdapter(apb.SetAdapterRequest(name=""))
    assert not to_base.HasField("adapter") and to_base.previous_default_adapter == "math"

    stub.SetAdapter(apb.SetAdapterRequest(name="poet"))
    gone = stub.UnloadAdapter(apb.UnloadAdapterRequest(name="poet"))
    assert gone.adapter.name == "poet" and gone.adapter.is_default
    listing = stub.ListAdapters(apb.ListAdaptersRequest())
    assert [x.name for x in listing.adapters] == ["math"] and listing.default_adapter == ""


def test_replace_bumps_the_version(make_server, adapter_dirs):
    h = make_server()
    request = apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["poet"]), replace=True)
    replaced = h.adapters.LoadAdapter(request)
    assert replaced.adapter.version == 2 and replaced.adapter.rank == 8 and not replaced.already_loaded


def test_unload_allow_missing(server):
    response = server.adapters.UnloadAdapter(apb.UnloadAdapterRequest(name="nope", allow_missing=True))
    assert not response.HasField("adapter")
    failure = expect_failure(server.adapters.UnloadAdapter, apb.UnloadAdapterRequest(name="nope"))
    assert failure.code is Code.NOT_FOUND and failure.info.reason == "ADAPTER_NOT_FOUND"
    assert failure.info.metadata["adapter"] == "nope"


def test_list_pages(make_server, adapter_dirs):
    h = make_server(adapters={f"a{i}": adapter_dirs["math"] for i in range(5)})
    stub, names, token = h.adapters, [], ""
    pages = 0
    while True:
        page = stub.ListAdapters(apb.ListAdaptersRequest(page_size=2, page_token=token))
        names += [a.name for a in page.adapters]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert names == ["a0", "a1", "a2", "a3", "a4"] and pages == 3

    first = stub.ListAdapters(apb.ListAdaptersRequest(page_size=2))
    stub.UnloadAdapter(apb.UnloadAdapterRequest(name="a1"))  # the last name of the page is gone: still valid
    stub.UnloadAdapter(apb.UnloadAdapterRequest(name="a2"))
    rest = stub.ListAdapters(apb.ListAdaptersRequest(page_size=0, page_token=first.next_page_token))
    assert [a.name for a in rest.adapters] == ["a3", "a4"] and rest.next_page_token == ""

    bad = expect_failure(stub.ListAdapters, apb.ListAdaptersRequest(page_token="not-a-token"))
    assert bad.code is Code.INVALID_ARGUMENT and bad.fields == ["page_token"]
    bad = expect_failure(stub.ListAdapters, apb.ListAdaptersRequest(page_size=-1))
    assert bad.code is Code.INVALID_ARGUMENT and bad.fields == ["page_size"]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": "-bad", "source": "/x"}, "name"),
        ({"name": "", "source": "/x"}, "name"),
        ({"name": "ok", "source": ""}, "source"),
        ({"name": "ok", "source": "SRC", "subfolder": "../up"}, "subfolder"),
        ({"name": "ok", "source": "SRC", "subfolder": "/abs"}, "subfolder"),
        ({"name": "ok", "source": "SRC", "revision": "main"}, "revision"),  # local folders have no revisions
        ({"name": "ok", "source": "SRC", "revision": "r" * 300}, "revision"),
    ],
)
def test_load_invalid_argument(server, adapter_dirs, request_fields, field):
    if request_fields["source"] == "SRC":
        request_fields["source"] = str(adapter_dirs["math"])
    failure = expect_failure(server.adapters.LoadAdapter, apb.LoadAdapterRequest(**request_fields))
    assert failure.code is Code.INVALID_ARGUMENT and failure.info.reason == "INVALID_ARGUMENT"
    assert failure.fields == [field]
    assert failure.bad_request.field_violations[0].description == failure.message


@pytest.mark.parametrize(
    ("rpc", "message"),
    [
        ("GetAdapter", apb.GetAdapterRequest(name="")),
        ("GetAdapter", apb.GetAdapterRequest(name="no spaces")),
        ("SetAdapter", apb.SetAdapterRequest(name=".dot")),
        ("UnloadAdapter", apb.UnloadAdapterRequest(name="")),
    ],
)
def test_name_invalid_argument(server, rpc, message):
    failure = expect_failure(getattr(server.adapters, rpc), message)
    assert failure.code is Code.INVALID_ARGUMENT and failure.fields == ["name"]


def test_not_found(server, tmp_path):
    for rpc, request in [
        ("GetAdapter", apb.GetAdapterRequest(name="nope")),
        ("SetAdapter", apb.SetAdapterRequest(name="nope")),
    ]:
        failure = expect_failure(getattr(server.adapters, rpc), request)
        assert failure.code is Code.NOT_FOUND and failure.info.reason == "ADAPTER_NOT_FOUND"
        assert failure.info.metadata["adapter"] == "nope"
    missing = str(tmp_path / "missing")
    failure = expect_failure(server.adapters.LoadAdapter, apb.LoadAdapterRequest(name="x", source=missing))
    assert failure.code is Code.NOT_FOUND and failure.info.reason == "ADAPTER_SOURCE_NOT_FOUND"
    assert failure.info.metadata["source"] == missing


def test_already_exists(server, adapter_dirs):
    request = apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["poet"]))
    failure = expect_failure(server.adapters.LoadAdapter, request)
    assert failure.code is Code.ALREADY_EXISTS and failure.info.reason == "ADAPTER_ALREADY_EXISTS"
    assert failure.info.metadata["adapter"] == "math"


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    config_path = dst / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if how == "unsupported":
        config["use_dora"] = True
    elif how == "incompatible":
        config["target_modules"] = ["no_such_proj"]
    if how == "corrupt":
        weights = dst / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    config_path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("how", "reason"),
    [("unsupported", "ADAPTER_UNSUPPORTED"), ("incompatible", "ADAPTER_INCOMPATIBLE"), ("corrupt", "ADAPTER_CORRUPT")],
)
def test_failed_precondition(server, adapter_dirs, tmp_path, how, reason):
    source = _broken_copy(adapter_dirs["math"], tmp_path / how, how)
    failure = expect_failure(server.adapters.LoadAdapter, apb.LoadAdapterRequest(name="bad", source=str(source)))
    assert failure.code is Code.FAILED_PRECONDITION and failure.info.reason == reason
    violations = failure.precondition.violations
    assert violations and all(v.type == reason and v.subject == "bad" and v.description for v in violations)
    listing = server.adapters.ListAdapters(apb.ListAdaptersRequest())
    assert [a.name for a in listing.adapters] == ["math", "poet"]  # a failed load leaves no trace


def test_rank_above_server_maximum_is_incompatible(make_server, adapter_dirs):
    h = make_server(adapters={}, max_rank=4)
    failure = expect_failure(h.adapters.LoadAdapter, apb.LoadAdapterRequest(name="p", source=str(adapter_dirs["poet"])))
    assert failure.code is Code.FAILED_PRECONDITION and failure.info.reason == "ADAPTER_INCOMPATIBLE"


def test_capacity(make_server, adapter_dirs):
    h = make_server(adapters={}, max_adapters=1)
    h.adapters.LoadAdapter(apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["math"]), pinned=True))
    failure = expect_failure(
        h.adapters.LoadAdapter, apb.LoadAdapterRequest(name="poet", source=str(adapter_dirs["poet"]))
    )
    assert failure.code is Code.RESOURCE_EXHAUSTED and failure.info.reason == "RESOURCE_EXHAUSTED"
    assert failure.info.metadata["limit"] == "maxAdapters" and failure.info.metadata["limitValue"] == "1"
    assert failure.retry is None  # waiting does not help: an operator must unload or unpin


def test_lru_eviction_makes_room(make_server, adapter_dirs):
    h = make_server(adapters={}, max_adapters=1)
    h.adapters.LoadAdapter(apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["math"])))
    h.adapters.LoadAdapter(apb.LoadAdapterRequest(name="poet", source=str(adapter_dirs["poet"])))
    listed = {a.name: a.state for a in h.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    assert listed == {"math": apb.ADAPTER_STATE_NOT_RESIDENT, "poet": apb.ADAPTER_STATE_RESIDENT}  # math: evicted


class _UnreachableHub(AdapterSource):
    name = "hub"

    def claims(self, location: AdapterLocation) -> bool:
        return location.model_id.startswith("owner/")

    def fetch(self, location: AdapterLocation) -> AdapterFiles:
        raise AdapterSourceUnavailableError(f"Hub repo {location.model_id!r} could not be reached", field="source")


def test_source_unavailable(make_server):
    h = make_server(adapters={}, sources=[_UnreachableHub()])
    failure = expect_failure(h.adapters.LoadAdapter, apb.LoadAdapterRequest(name="x", source="owner/repo"))
    assert failure.code is Code.UNAVAILABLE and failure.info.reason == "ADAPTER_SOURCE_UNAVAILABLE"
    assert failure.info.metadata["source"] == "owner/repo" and failure.retry is not None


def test_shutting_down_refuses_changes_but_serves_reads(server, adapter_dirs):
    server.server.runtime.stop_accepting()
    for rpc, request in [
        ("LoadAdapter", apb.LoadAdapterRequest(name="x", source=str(adapter_dirs["math"]))),
        ("UnloadAdapter", apb.UnloadAdapterRequest(name="math")),
        ("SetAdapter", apb.SetAdapterRequest(name="math")),
    ]:
        failure = expect_failure(getattr(server.adapters, rpc), request)
        assert failure.code is Code.UNAVAILABLE and failure.info.reason == "SHUTTING_DOWN"
    assert len(server.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters) == 2


def test_internal_error_is_generic(server, monkeypatch, caplog):
    manager = server.engine.manager

    def explode():
        raise ValueError("secret detail: /srv/private/path")

    monkeypatch.setattr(manager, "list_adapters", explode)
    call = server.adapters.ListAdapters.with_call
    failure = expect_failure(call, apb.ListAdaptersRequest(), metadata=(("x-request-id", "req-42"),))
    assert failure.code is Code.INTERNAL and failure.info.reason == "INTERNAL"
    assert "secret" not in failure.message and "req-42" in failure.message
    assert failure.info.metadata["requestId"] == "req-42" and failure.trailing["x-request-id"] == "req-42"
    assert "secret detail" in caplog.text and "req-42" in caplog.text  # the details stay in the server log


def test_request_id_echo(server):
    _, call = server.adapters.ListAdapters.with_call(apb.ListAdaptersRequest(), metadata=(("x-request-id", "my-id.1"),))
    assert dict(call.initial_metadata())["x-request-id"] == "my-id.1"
    _, call = server.adapters.ListAdapters.with_call(apb.ListAdaptersRequest(), metadata=(("x-request-id", "bad id"),))
    generated = dict(call.initial_metadata())["x-request-id"]
    assert generated != "bad id" and len(generated) == 36  # an unusable id is replaced by a UUID


def test_load_from_outside_the_adapter_roots_is_permission_denied(make_server, adapter_dirs, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(adapter_dirs["poet"], outside)
    server = make_server(adapters={}, adapter_roots=(str(adapter_dirs["math"].parent),), allow_hub_adapters=False)
    failure = expect_failure(server.adapters.LoadAdapter, apb.LoadAdapterRequest(name="x", source=str(outside)))
    assert failure.code is grpc.StatusCode.PERMISSION_DENIED
    assert failure.info.reason == "ADAPTER_SOURCE_FORBIDDEN" and failure.info.metadata["source"] == str(outside)
    hub = expect_failure(server.adapters.LoadAdapter, apb.LoadAdapterRequest(name="y", source="someone/adapter"))
    assert hub.code is grpc.StatusCode.PERMISSION_DENIED and "Hub is turned off" in hub.message
    assert not server.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters  # nothing half-loaded
    inside = server.adapters.LoadAdapter(apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["math"])))
    assert inside.adapter.name == "math"


def test_adapter_root_flags(tmp_path):
    from loramux.service import __main__ as service_main

    parse = service_main.build_parser().parse_args
    args = parse(["--model", "m", "--adapter-root", str(tmp_path), "--no-hub-adapters"])
    config = service_main.config_from_args(args, {})
    assert config.adapter_roots == (str(tmp_path),) and config.allow_hub_adapters is False
    default = service_main.config_from_args(parse(["--model", "m"]), {})
    assert default.adapter_roots is None and default.allow_hub_adapters is True
    with pytest.raises(ValueError, match="--adapter-root: not a folder"):
        service_main.config_from_args(parse(["--model", "m", "--adapter-root", str(tmp_path / "nope")]), {})
