"""A replica killed (SIGKILL) or stopped (SIGTERM) behind HAProxy: new calls keep succeeding, streams never hang.

Each test brings the replica back (same port and id) before it ends, for the tests after it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc

from loramux.deploy.cluster import Cluster
from tests.deploy.conftest import NAMES, replica_of, request, routed

Code = grpc.StatusCode


def home_of(generation, adapter: str) -> str:
    call = generation.Generate(request(adapter), metadata=routed(adapter), timeout=30)
    list(call)
    return replica_of(call)


def adapters_homed(generation, replica: str) -> list[str]:
    return [name for name in NAMES if home_of(generation, name) == replica]


def outcome(call) -> str:
    """How a stream ended: OK (with its finished event), or its status code's name."""
    try:
        responses = list(call)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK" if responses and responses[-1].HasField("finished") else "NO FINISHED EVENT"


def test_sigkill_new_calls_succeed_within_2_s_and_running_streams_end_with_a_status(cluster: Cluster, generation):
    victim = cluster.replicas[0]
    adapter = adapters_homed(generation, victim.name)[0]
    # Six long streams on the adapter: the victim takes its bounded share of them, the others spill over.
    calls = [generation.Generate(request(adapter, tokens=250), metadata=routed(adapter), timeout=60) for _ in range(6)]
    on_victim = [c for c in calls if replica_of(c) == victim.name]
    assert on_victim, "no stream landed on the adapter's home replica"
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        endings = [pool.submit(outcome, c) for c in calls]
        killed = time.monotonic()
        victim.kill()
        assert victim.wait(10) == -9
        for call, ending in zip(calls, endings, strict=True):
            status = ending.result(timeout=10)  # never hangs: every stream ends, well before its deadline
            if call in on_victim:
                assert status in ("UNKNOWN", "UNAVAILABLE", "INTERNAL", "CANCELLED"), status
            else:
                assert status == "OK", status
    # New calls for the killed replica's adapter: retried on another replica (redispatch), none fails.
    latencies = []
    while time.monotonic() - killed < 3.0:
        started = time.monotonic()
        call = generation.Generate(request(adapter), metadata=routed(adapter), timeout=10)
        assert outcome(call) == "OK"
        assert replica_of(call) != victim.name
        latencies.append(time.monotonic() - started)
    assert max(latencies) < 2.0, latencies
    states = cluster.wait_states(lambda s: s.get(victim.name) == "DOWN", timeout=5)
    assert states[victim.name] == "DOWN"
    cluster.restart(0)
    assert home_of(generation, adapter) == victim.name  # back, and its adapters hash to it again


def test_sigterm_drains_without_a_failed_call(cluster: Cluster, generation):
    victim = cluster.replicas[1]
    homed = adapters_homed(generation, victim.name)
    streams = [generation.Generate(request(a, tokens=120), metadata=routed(a), timeout=60) for a in homed[:3]]
    failures: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def traffic(offset: int) -> None:  # short calls over every adapter, the victim's among them
        i = offset
        while not stop.is_set():
            name = NAMES[i % len(NAMES)]
            call = generation.Generate(request(name), metadata=routed(name), timeout=30)
            if (status := outcome(call)) != "OK":
                failures.append(f"{name}: {status}")
            else:
                served.append(replica_of(call))
            i += 1

    with concurrent.futures.ThreadPoolExecutor(3 + len(streams)) as pool:
        endings = [pool.submit(outcome, s) for s in streams]
        drivers = [pool.submit(traffic, k * 7) for k in range(3)]
        victim.terminate()
        try:
            assert victim.wait(30) == 0  # NOT_SERVING, --drain-delay, then the grace period for running streams
        finally:
            stop.set()
        for driver in drivers:
            driver.result(timeout=30)
        assert [e.result(timeout=30) for e in endings] == ["OK"] * len(streams)
    assert not failures, failures
    assert len(served) > 10 and victim.name in served  # it served during its drain delay, then the others did
    cluster.restart(1)
