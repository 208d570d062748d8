"""One local cluster for the tests of tests/deploy: three replicas of the embedded demo model behind HAProxy.

The replicas load on demand from one shared adapter root holding the demo's adapters under 24 more names
(t00 ... t23, copies), so routing has enough keys to show how it spreads them. The cluster is started once
per session (about 10 s on 2 cores) and shared; tests that stop a replica start it again before they end.
Without HAProxy every test that needs it is skipped, saying how to install it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loramux.demo import ADAPTERS_DIR
from loramux.deploy.cluster import Cluster, ClusterSpec
from loramux.deploy.processes import HAPROXY_HINT, find_haproxy
from loramux.v1 import generation_service_pb2 as gpb
from loramux.v1 import generation_service_pb2_grpc as gpb_grpc
from tests.service.harness import make_server

__all__ = ["make_server"]  # an in-process server, for the health probe's byte-level tests

DEMO = ("upper", "rot13", "reverse")
NAMES = tuple(f"t{i:02d}" for i in range(24))
ADAPTER_KEY, REPLICA_KEY = "x-loramux-adapter", "x-loramux-replica"


def haproxy_or_skip() -> str:
    binary = find_haproxy()
    if binary is None:
        pytest.skip(f"HAProxy is not installed (no `haproxy` on PATH): {HAPROXY_HINT}")
    return binary


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapter-root")
    for i, name in enumerate(NAMES):
        shutil.copytree(ADAPTERS_DIR / DEMO[i % len(DEMO)], root / name)
    return root


@pytest.fixture(scope="session")
def cluster(adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    haproxy_or_skip()
    spec = ClusterSpec(
        replicas=3,
        server_flags=("--adapter-root", str(adapter_root), "--grace-period", "5"),
        log_dir=tmp_path_factory.mktemp("cluster-logs"),
        env=(("OMP_NUM_THREADS", "1"),),  # three replicas on two cores: one thread each
    )
    with Cluster(spec) as running:
        yield running


@pytest.fixture(scope="session")
def channel(cluster: Cluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def generation(channel: grpc.Channel) -> gpb_grpc.GenerationServiceStub:
    return gpb_grpc.GenerationServiceStub(channel)


def request(adapter: str | None = None, *, tokens: int = 4, **fields) -> gpb.GenerateRequest:
    stopping = gpb.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True)
    extra = {"adapter": adapter} if adapter is not None else {}
    return gpb.GenerateRequest(text="Return the", stopping=stopping, **extra, **fields)


def routed(adapter: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata the clients send: the routing key for a named adapter, nothing for the base model."""
    return ((ADAPTER_KEY, adapter),) if adapter else ()


def replica_of(call) -> str:
    return dict(call.initial_metadata() or ())[REPLICA_KEY]
