"""Adapters at platform scale through gRPC: load on demand, its errors, the registered/resident view, budgets,
flags and metrics."""

from __future__ import annotations

import concurrent.futures
import shutil

import grpc
import pytest

import loramux.service.__main__ as service_main
from loramux.core import GenerationRequest, TokenDelta
from loramux.service.sizes import format_size, parse_size
from loramux.v1 import adapter_service_pb2 as apb
from loramux.v1 import generation_service_pb2 as gpb
from tests.service.harness import expect_failure
from tests.service.test_metrics import scrape, value

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Code = grpc.StatusCode


@pytest.fixture
def root(tmp_path, adapter_dirs):
    """An adapter root: tenant-1/math and tenant-2/poet (copies), a corrupt one, and a symlink out of it."""
    root = tmp_path / "root"
    for name, source in (("tenant-1/math", "math"), ("tenant-2/poet", "poet")):
        shutil.copytree(adapter_dirs[source], root / name)
    (root / "broken").mkdir()
    shutil.copy(adapter_dirs["math"] / "adapter_config.json", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (root / "escape").symlink_to(adapter_dirs["math"], target_is_directory=True)
    return root


def request(adapter: str, n: int = 5) -> gpb.GenerateRequest:
    return gpb.GenerateRequest(
        text="Prove that", adapter=adapter, stopping=gpb.StoppingCriteria(max_new_tokens=n, ignore_eos=True)
    )


def text_of(responses) -> str:
    return "".join(r.chunk.text for r in responses if r.HasField("chunk"))


def reference(engine, adapter: str, n: int = 5) -> str:
    req = GenerationRequest(prompt="Prove that", adapter=adapter, max_new_tokens=n, ignore_eos=True)
    return "".join(e.text for e in engine.submit(req) if isinstance(e, TokenDelta))


def test_generate_loads_an_unregistered_adapter_on_demand(make_server, root):
    h = make_server(adapters={}, load_on_demand=True, adapter_roots=(str(root),), metrics_port=0)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        texts = list(
            pool.map(lambda _: text_of(h.generation.Generate(request("tenant-1/math"), timeout=60)), range(20))
        )
    (listed,) = h.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters
    assert listed.name == "tenant-1/math" and listed.on_demand and listed.state == apb.ADAPTER_STATE_RESIDENT
    assert listed.requests_served == 20 and listed.source == str(root / "tenant-1" / "math")
    assert len(set(texts)) == 1
    s = scrape(h)
    assert value(s, "loramux_adapter_on_demand_loads_total") == 1  # 20 requests, one load
    assert value(s, "loramux_adapter_resident_hits_total") + value(s, "loramux_adapter_resident_misses_total") == 20
    assert value(s, "loramux_adapters_registered") == 1
    assert texts[0] == reference(h.engine, "tenant-1/math")


def test_on_demand_errors(make_server, root):
    h = make_server(adapters={}, load_on_demand=True, adapter_roots=(str(root),), allow_hub_adapters=False)
    missing = expect_failure(h.generation.Generate, request("tenant-9/nope"), timeout=30)
    assert missing.code is Code.NOT_FOUND and missing.info.reason == "ADAPTER_NOT_FOUND"
    assert missing.info.metadata["searched"] == str(root / "tenant-9" / "nope")
    escape = expect_failure(h.generation.Generate, request("escape"), timeout=30)
    assert escape.code is Code.PERMISSION_DENIED and escape.info.reason == "ADAPTER_SOURCE_FORBIDDEN"
    for bad in ("../escape", "a//b", "/etc"):
        invalid = expect_failure(h.generation.Generate, request(bad), timeout=30)
        assert invalid.code is Code.INVALID_ARGUMENT and invalid.fields == ["adapter"]
    corrupt = expect_failure(h.generation.Generate, request("broken"), timeout=30)
    assert corrupt.code is Code.FAILED_PRECONDITION and corrupt.info.reason == "ADAPTER_CORRUPT"
    assert list(h.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters) == []  # nothing registered
    assert text_of(h.generation.Generate(request("tenant-2/poet"), timeout=30))  # others unharmed


def test_without_load_on_demand_an_unknown_name_is_not_found(make_server, root):
    h = make_server(adapters={}, adapter_roots=(str(root),))
    failure = expect_failure(h.generation.Generate, request("tenant-1/math"), timeout=30)
    assert failure.code is Code.NOT_FOUND and "searched" not in failure.info.metadata


def test_evicted_adapters_stay_registered_and_come_back(make_server, adapter_dirs):
    h = make_server(adapters={}, max_adapters=1)
    for name in ("math", "poet"):
        h.adapters.LoadAdapter(apb.LoadAdapterRequest(name=name, source=str(adapter_dirs[name])))
    math = h.adapters.GetAdapter(apb.GetAdapterRequest(name="math")).adapter
    assert math.state == apb.ADAPTER_STATE_NOT_RESIDENT and math.size_bytes > 0 and math.rank == 4
    first = list(h.generation.Generate(request("math"), timeout=30))
    assert first[-1].finished.adapter_version == 1
    assert h.adapters.GetAdapter(apb.GetAdapterRequest(name="math")).adapter.state == apb.ADAPTER_STATE_RESIDENT
    assert h.adapters.GetAdapter(apb.GetAdapterRequest(name="poet")).adapter.state == apb.ADAPTER_STATE_NOT_RESIDENT
    assert text_of(first) == text_of(h.generation.Generate(request("math"), timeout=30))


def test_an_adapter_that_can_never_fit_is_resource_exhausted(make_server, adapter_dirs):
    h = make_server(adapters={}, max_adapter_bytes=1024)  # smaller than any adapter
    failure = expect_failure(
        h.adapters.LoadAdapter, apb.LoadAdapterRequest(name="math", source=str(adapter_dirs["math"]))
    )
    assert failure.code is Code.RESOURCE_EXHAUSTED
    assert failure.info.metadata["limit"] == "maxAdapterMemory" and failure.info.metadata["limitValue"] == "1024"


def test_flags(tmp_path):
    parse = service_main.build_parser().parse_args
    args = ["--model", "x", "--load-on-demand", "--adapter-root", str(tmp_path), "--max-adapter-memory", "2GiB"]
    config = service_main.config_from_args(parse(args), {})
    assert config.load_on_demand and config.max_adapter_bytes == 2 << 30 and config.adapter_roots == (str(tmp_path),)
    with pytest.raises(ValueError, match="needs an --adapter-root or Hub adapters"):
        service_main.config_from_args(parse(["--model", "x", "--load-on-demand", "--no-hub-adapters"]), {})
    with pytest.raises(SystemExit):
        parse(["--model", "x", "--max-adapter-memory", "lots"])


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("8MiB", 8 << 20), ("1.5 GiB", 3 << 29), ("2GB", 2_000_000_000), ("512kib", 512 << 10)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


def test_sizes_refuse_what_they_do_not_know():
    for bad in ("", "-1MiB", "2 gigs", "1e9"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)
    assert format_size(3 << 29) == "1.5GiB" and format_size(100) == "100B"
