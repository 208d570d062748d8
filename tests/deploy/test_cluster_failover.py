"""A replica killed (SIGKILL) or stopped (SIGTERM) behind HAProxy: new calls keep succeeding, streams never hang.

Each test brings the replica back (same port and id) before it ends, for the tests after it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc

from loramux.deploy.cluster import Cluster, Replica
from tests.deploy.conftest import NAMES, replica_of, request, routed

Code = grpc.StatusCode


def home_of(generation, adapter: str) -> str:
    call = generation.Generate(request(adapter), metadata=routed(adapter), timeout=30)
    list(call)
    return replica_of(call)


def adapters_homed(generation, replica: str) -> list[str]:
    return [name for name in NAMES if home_of(generation, name) == replica]


@contextlib.contextmanager
def brought_back(cluster: Cluster, index: int) -> Iterator[Replica]:
    """The replica ``index``; when the block fails, it is started again (after a drain under way ends) before
    the failure goes on, so that one failed test does not take the replica from the tests after it."""
    replica = cluster.replicas[index]
    try:
        yield replica
    except BaseException:
        if replica.alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.wait(30)  # a SIGTERM drain ends within --drain-delay and --grace-period
        if not replica.alive:
            cluster.restart(index)
        raise


def outcome(call) -> str:
    """How a stream ended: OK (with its finished event), or its status code's name."""
    try:
        responses = list(call)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK" if responses and responses[-1].HasField("finished") else "NO FINISHED EVENT"


def long_streams_running_on(generation, adapter: str, replica: str, *, tries: int = 3) -> tuple[list, list]:
    """Six long streams on ``adapter`` (the replica takes its bounded share, the others spill over), and those
    of them on ``replica``, at least one still running. A 250-token stream takes about a second on 2 cores, so
    on a stalled machine the replica's share may end before the caller kills it: then six more are started.
    "OK" in ``outcome`` means a stream arrived whole, with its finished event, so one that ended before the
    kill is told apart from one the kill truncated."""
    for _ in range(tries):
        long = request(adapter, tokens=250)
        calls = [generation.Generate(long, metadata=routed(adapter), timeout=60) for _ in range(6)]
        on_replica = [c for c in calls if replica_of(c) == replica]
        assert on_replica, "no stream landed on the adapter's home replica"
        if any(not c.done() for c in on_replica):
            return calls, on_replica
        for call in calls:
            call.cancel()
    raise AssertionError(f"in {tries} tries, every stream on {replica} ended before it could be killed")


def test_sigkill_new_calls_succeed_within_2_s_and_running_streams_end_with_a_status(cluster: Cluster, generation):
    with brought_back(cluster, 0) as victim:
        adapter = adapters_homed(generation, victim.name)[0]
        calls, on_victim = long_streams_running_on(generation, adapter, victim.name)
        latencies = []
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            endings = [pool.submit(outcome, c) for c in calls]
            running = [c for c in on_victim if not c.done()]
            killed = time.monotonic()
            victim.kill()
            assert victim.wait(10) == -9
            cut = []
            for call, ending in zip(calls, endings, strict=True):
                if call in on_victim:  # never hangs: each ends at once, with a status, or had ended whole
                    status = ending.result(timeout=10)
                    assert status in ("UNKNOWN", "UNAVAILABLE", "INTERNAL", "CANCELLED", "OK"), status
                    if status != "OK":
                        cut.append(call)
            assert set(cut) & set(running), "the kill cut none of the streams that were running on the victim"
            # New calls for the killed replica's adapter, while the other streams still run: retried on another
            # replica (redispatch), none fails. At least one call, however slow the machine.
            while not latencies or time.monotonic() - killed < 3.0:
                started = time.monotonic()
                call = generation.Generate(request(adapter), metadata=routed(adapter), timeout=10)
                assert outcome(call) == "OK"
                assert replica_of(call) != victim.name
                latencies.append(time.monotonic() - started)
            for call, ending in zip(calls, endings, strict=True):
                if call not in on_victim:
                    assert ending.result(timeout=60) == "OK"  # within their deadline
        assert max(latencies) < 2.0, latencies
        states = cluster.wait_states(lambda s: s.get(victim.name) == "DOWN", timeout=5)
        assert states[victim.name] == "DOWN"
        cluster.restart(0)
        assert home_of(generation, adapter) == victim.name  # back, and its adapters hash to it again


def test_sigterm_drains_without_a_failed_call(cluster: Cluster, generation):
    with brought_back(cluster, 1) as victim:
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
