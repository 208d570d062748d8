"""Routing through HAProxy: each adapter stays on one replica while adapters spread over all of them; a hot
adapter's concurrent streams spill over to other replicas (bounded loads); base-model calls spread."""

from __future__ import annotations

import collections

from tests.deploy.conftest import NAMES, replica_of, request, routed


def serve(generation, adapter: str | None) -> str:
    call = generation.Generate(request(adapter), metadata=routed(adapter), timeout=30)
    responses = list(call)
    assert responses[-1].finished.adapter == (adapter or "")
    return replica_of(call)


def test_each_adapter_stays_on_one_replica_and_adapters_spread_evenly(cluster, generation):
    homes: dict[str, set[str]] = collections.defaultdict(set)
    for _ in range(3):
        for name in NAMES:
            homes[name].add(serve(generation, name))
    assert all(len(replicas) == 1 for replicas in homes.values()), homes  # affinity
    per_replica = collections.Counter(next(iter(r)) for r in homes.values())
    assert set(per_replica) == {r.name for r in cluster.replicas}, per_replica
    assert min(per_replica.values()) >= len(NAMES) // 6, per_replica  # even: 24 adapters, at least 4 each


def test_base_model_calls_spread_over_the_replicas(cluster, generation):
    replicas = collections.Counter(serve(generation, "") for _ in range(6))
    assert len(replicas) >= 2, replicas  # leastconn: equal loads take turns


def test_a_hot_adapter_spills_over_to_other_replicas(cluster, generation):
    """30 concurrent streams of one adapter: bounded loads (hash-balance-factor 125) cap each replica near
    125 % of the average, so they spread over at least two replicas; the adapter's home takes its share."""
    home = serve(generation, "t03")
    calls = [generation.Generate(request("t03", tokens=250), metadata=routed("t03"), timeout=60) for _ in range(30)]
    try:
        placed = collections.Counter(replica_of(call) for call in calls)  # each waits for the call's headers
    finally:
        for call in calls:
            call.cancel()
    assert len(placed) >= 2 and sum(placed.values()) == 30, placed
    assert max(placed.values()) <= 15, placed  # 30 / 3 x 1.25, rounded up, plus the +1 HAProxy counts
    assert placed[home] > 0, placed
