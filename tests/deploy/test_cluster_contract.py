"""The gRPC contract through HAProxy behaves as it does direct: streaming, rich errors, x-request-id, cancel,
deadlines and health (each checked against a direct call to the replica that served it)."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.deploy.cluster import Cluster
from loramux.v1 import generation_service_pb2 as gpb
from loramux.v1 import generation_service_pb2_grpc as gpb_grpc
from tests.deploy.conftest import REPLICA_KEY, replica_of, request, routed
from tests.service.harness import expect_failure, wait_until

Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING


def direct(cluster: Cluster, name: str) -> grpc.Channel:
    (replica,) = [r for r in cluster.replicas if r.name == name]
    return grpc.insecure_channel(replica.address)


def tokens_of(responses) -> list[int]:
    return [i for r in responses if r.HasField("chunk") for i in r.chunk.token_ids]


@pytest.mark.parametrize("adapter", ["upper", "t05", ""])
def test_stream_is_the_direct_stream_incrementally(cluster, generation, adapter):
    call = generation.Generate(request(adapter, tokens=24), metadata=routed(adapter), timeout=30)
    arrivals, responses = [], []
    for response in call:
        arrivals.append(time.monotonic())
        responses.append(response)
    assert responses[-1].HasField("finished") and len(responses) > 2  # several chunks, then finished
    assert responses[-1].finished.adapter == adapter and responses[-1].finished.usage.completion_tokens == 24
    assert arrivals[-1] > arrivals[0]  # not buffered into one burst by the proxy
    with direct(cluster, replica_of(call)) as channel:
        stub = gpb_grpc.GenerationServiceStub(channel)
        assert tokens_of(stub.Generate(request(adapter, tokens=24), timeout=30)) == tokens_of(responses)


def test_request_id_and_replica_in_initial_metadata(generation):
    call = generation.Generate(request("upper"), metadata=(*routed("upper"), ("x-request-id", "via-haproxy")))
    list(call)
    metadata = dict(call.initial_metadata())
    assert metadata["x-request-id"] == "via-haproxy"
    assert metadata[REPLICA_KEY].startswith("replica-")


def test_rich_errors_keep_their_details(cluster, generation):
    missing = request("no-such-adapter")
    metadata = (*routed("no-such-adapter"), ("x-request-id", "lost-1"))
    via = expect_failure(list, generation.Generate(missing, metadata=metadata, timeout=30))
    assert via.code is Code.NOT_FOUND and via.info.reason == "ADAPTER_NOT_FOUND"
    assert via.info.metadata["requestId"] == "lost-1" and "searched" in via.info.metadata  # load on demand looked
    assert via.trailing["x-request-id"] == "lost-1" and via.trailing[REPLICA_KEY].startswith("replica-")
    with direct(cluster, via.trailing[REPLICA_KEY]) as channel:
        stub = gpb_grpc.GenerationServiceStub(channel)
        plain = expect_failure(list, stub.Generate(missing, metadata=metadata, timeout=30))
    assert (plain.code, plain.message, dict(plain.info.metadata)) == (via.code, via.message, dict(via.info.metadata))

    bad = request("upper", sampling=gpb.SamplingParams(top_p=3.0))
    invalid = expect_failure(list, generation.Generate(bad, metadata=routed("upper"), timeout=30))
    assert invalid.code is Code.INVALID_ARGUMENT and invalid.fields == ["sampling.top_p"]
    wrong_key = expect_failure(list, generation.Generate(request("upper"), metadata=routed("rot13"), timeout=30))
    assert wrong_key.info.reason == "ADAPTER_METADATA_MISMATCH" and wrong_key.fields == ["x-loramux-adapter"]


def _requests_with(replica, status: str) -> float:
    samples = replica.scrape()
    return sum(v for k, v in samples.items() if k.startswith("loramux_requests_total{") and f'status="{status}"' in k)


def _running(replica) -> float:
    return replica.scrape()["loramux_num_requests_running"]


def test_cancel_reaches_the_replica(cluster, generation):
    call = generation.Generate(request("rot13", tokens=250), metadata=routed("rot13"), timeout=60)
    next(call), next(call)
    (replica,) = [r for r in cluster.replicas if r.name == replica_of(call)]
    before = _requests_with(replica, "CANCELLED")
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() is Code.CANCELLED
    wait_until(lambda: _requests_with(replica, "CANCELLED") == before + 1, what="the replica to log CANCELLED")
    wait_until(lambda: _running(replica) == 0, what="the cancelled row to leave the batch")


def test_deadline_is_deadline_exceeded_on_time(cluster, generation):
    started = time.monotonic()
    # 250 tokens take the demo model about a second here; the deadline passes first, mid-stream
    call = generation.Generate(request("reverse", tokens=250), metadata=routed("reverse"), timeout=0.3)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    elapsed = time.monotonic() - started
    assert caught.value.code() is Code.DEADLINE_EXCEEDED and 0.25 <= elapsed < 1.5, elapsed
    for replica in cluster.replicas:  # the replica saw grpc-timeout and stopped too
        wait_until(lambda r=replica: _running(r) == 0, what=f"{replica.name} to drop the expired row")


def test_health_check_and_watch(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "loramux.v1.GenerationService", "loramux.v1.AdapterService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert caught.value.code() is Code.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service="loramux.v1.GenerationService"), timeout=10)
    assert next(watch).status == SERVING  # a stream that stays open, as direct
    watch.cancel()
