"""Several replicas behind HAProxy: adapter hashing vs round-robin on the same replicas, and the HAProxy hop.

    make bench-cluster      # or: python -m bench.cluster   (part of `make bench`)

Workload (issue #17): the bench's Llama-shaped model (hidden 512, 8 layers, fp32; bench/common.py) and 300
adapters r=16 on all seven projections in one shared adapter root (bench/scale.py's farm, built once under
build/bench-cluster/). Three replicas (``loramux-server --load-on-demand --adapter-root ROOT --max-adapters 16``,
one torch thread each, as the machine has two cores for three replicas, HAProxy and the client) behind three
HAProxy instances at once, all in front of the same replicas (loramux.deploy):

* ``hash``: the shipped configuration, ``balance hdr(x-loramux-adapter)``, consistent, bounded loads 125;
* ``hash-200``: the same with ``hash-balance-factor 200`` (affinity over evenness);
* ``round-robin``: the same replicas with ``balance roundrobin``, the baseline a plain balancer gives;
* ``one``: in front of the first replica alone, for the hop's cost vs calling that replica directly.

Each policy serves 480 requests whose adapters follow Zipf(1.0) over the 300 (a seeded draw), 24 in flight
through the asyncio client (which sends x-loramux-adapter), 32 prompt and 16 new tokens, greedy, ignore_eos.
Before each, every replica's adapters are unloaded (a cold start, on the same processes) and the 96 requests
drawn before those 480 (the same popularity) warm the caches up, untimed. The policies alternate over ROUNDS
rounds; medians. The adapter hit ratio is the replicas' own count (/metrics: loramux_adapter_resident_hits /
_misses: a Generate whose adapter was resident at admission, or had to wait for its load). The hop: 8
streams x 64 tokens on one adapter, three times over, direct and through ``one``, alternating, HOP_ROUNDS each.

For scale, the output also gives an LRU simulation of the same popularity in steady state (``lru_bound``: each
adapter on one replica chosen at random, no spill-over): about 59 % for hashing and 37 % for round-robin, 1.6x.
With Zipf(1.0) over 300 adapters and 16 slots a replica, round-robin already hits on the head of the
distribution, so 2x is out of reach of an LRU cache whatever the balancer does.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import OrderedDict
from pathlib import Path

import torch

from bench.common import cpu_model, llama_512
from bench.scale import PROMPT_TOKENS, farm, prompts, zipf
from loramux.client import AsyncLoramuxClient, LoramuxClient, TextChunk
from loramux.deploy.balancer import Balancer
from loramux.deploy.cluster import Cluster, ClusterSpec, Replica

N_ADAPTERS, BUDGET, REPLICAS = 300, 16, 3
REQUESTS, WARMUP, IN_FLIGHT, NEW_TOKENS, ROUNDS = 480, 96, 24, 16, 2  # prompts: bench.scale's, 32 tokens
HOP_STREAMS, HOP_TOKENS, HOP_ROUNDS = 8, 64, 5
WORKDIR = Path("build/bench-cluster")
NAMES = [f"a{i:04d}" for i in range(N_ADAPTERS)]
HIT, MISS = "loramux_adapter_resident_hits_total", "loramux_adapter_resident_misses_total"


def model_folder(workdir: Path) -> Path:
    """The bench model saved with farm()'s tokenizer, as `loramux-server --model` loads it (built once)."""
    folder = workdir / "model"
    if not (folder / "config.json").is_file():
        from transformers import AutoTokenizer

        llama_512().save_pretrained(folder)
        AutoTokenizer.from_pretrained(workdir / "tokenizer").save_pretrained(folder)
    return folder


async def closed_loop(target: str, names: list[str], tokens: list[list[int]], *, in_flight: int, new: int) -> float:
    """Keep ``in_flight`` Generate calls running until each of ``names`` is served; the seconds it took."""
    pending = iter(range(len(names)))

    async def worker(client: AsyncLoramuxClient) -> None:
        for i in pending:
            count = 0
            events = client.generate_events(tokens[i], adapter=names[i], max_new_tokens=new, ignore_eos=True)
            async for event in events:
                if isinstance(event, TextChunk):
                    count += len(event.token_ids)
            assert count == new, count

    async with AsyncLoramuxClient(target, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(in_flight)))
        return time.perf_counter() - start


def counters(replicas: list[Replica]) -> dict[str, list[float]]:
    """Hits, misses and finished Generate calls, per replica."""
    rows = [r.scrape() for r in replicas]
    served = [
        sum(v for k, v in row.items() if k.startswith("loramux_requests_total{") and "Generate" in k) for row in rows
    ]
    return {"hits": [row[HIT] for row in rows], "misses": [row[MISS] for row in rows], "served": served}


def unload_everything(replicas: list[Replica]) -> None:
    """A cold start on the same processes: every replica forgets every adapter (loaded again on demand)."""
    for replica in replicas:
        with LoramuxClient(replica.address, timeout=60) as client:
            for adapter in client.list_adapters():
                client.unload_adapter(adapter.name, allow_missing=True)


def run_policy(balancer: Balancer, replicas: list[Replica], names: list[str], warm: list[str]) -> dict:
    unload_everything(replicas)
    asyncio.run(closed_loop(balancer.address, warm, prompts(WARMUP, 3), in_flight=IN_FLIGHT, new=NEW_TOKENS))
    before = counters(replicas)
    seconds = asyncio.run(
        closed_loop(balancer.address, names, prompts(REQUESTS, 2), in_flight=IN_FLIGHT, new=NEW_TOKENS)
    )
    after = counters(replicas)
    delta = {k: [a - b for a, b in zip(after[k], before[k], strict=True)] for k in after}
    hits, misses = sum(delta["hits"]), sum(delta["misses"])
    return {
        "tok_s": REQUESTS * NEW_TOKENS / seconds,
        "hit_ratio": hits / (hits + misses),
        "served": [int(s) for s in delta["served"]],
    }


def lru_bound(draws: int = 100_000, seed: int = 1) -> tuple[float, float]:
    """Steady-state LRU hit ratios of ``BUDGET`` slots a replica: (adapter hashing, round-robin)."""

    def hits(stream: list[str]) -> int:
        cache: OrderedDict[str, None] = OrderedDict()
        found = 0
        for name in stream:
            if name in cache:
                found += 1
                cache.move_to_end(name)
            else:
                cache[name] = None
                if len(cache) > BUDGET:
                    cache.popitem(last=False)
        return found

    stream = zipf(NAMES, draws, seed=7)  # the benchmark's popularity (same ranking)
    rng = random.Random(seed)
    home = {name: rng.randrange(REPLICAS) for name in NAMES}
    hashed = sum(hits([n for n in stream if home[n] == r]) for r in range(REPLICAS))
    round_robin = sum(hits(stream[r::REPLICAS]) for r in range(REPLICAS))
    return hashed / draws, round_robin / draws


def hop(target: str) -> float:
    """Tokens per second of HOP_STREAMS concurrent streams of HOP_TOKENS on one adapter, three times over."""
    names = [NAMES[0]] * (3 * HOP_STREAMS)
    seconds = asyncio.run(closed_loop(target, names, prompts(len(names), 4), in_flight=HOP_STREAMS, new=HOP_TOKENS))
    return len(names) * HOP_TOKENS / seconds


def main() -> None:
    print(f"== bench.cluster on {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    root = farm(WORKDIR, count=N_ADAPTERS)
    flags = ("--model", str(model_folder(WORKDIR)), "--adapter-root", str(root), "--max-adapters", str(BUDGET))
    logs = WORKDIR / "logs"
    logs.mkdir(exist_ok=True)
    spec = ClusterSpec(
        replicas=REPLICAS,
        server_flags=(*flags, "--no-hub-adapters", "--log-level", "WARNING"),
        env=(("OMP_NUM_THREADS", "1"),),
        log_dir=logs,
    )
    drawn = zipf(NAMES, WARMUP + REQUESTS, seed=7)
    warm, names = drawn[:WARMUP], drawn[WARMUP:]
    with Cluster(spec) as cluster:
        print(
            f"HAProxy {cluster.version}; {N_ADAPTERS} adapters on disk, {REPLICAS} replicas x budget {BUDGET} "
            f"resident; {REQUESTS} requests (Zipf 1.0, {len(set(names))} distinct), {IN_FLIGHT} in flight, "
            f"{PROMPT_TOKENS}+{NEW_TOKENS} tokens; medians of {ROUNDS} rounds",
            flush=True,
        )
        every = cluster.replicas
        extra = {
            "hash-200": cluster.balancer_for(every, hash_balance_factor=200, name="haproxy-200"),
            "round-robin": cluster.balancer_for(every, balance="roundrobin", name="haproxy-rr"),
            "one": cluster.balancer_for(every[:1], name="haproxy-one"),
        }
        balancers = {"hash": cluster.balancer, **extra}
        try:
            for balancer in extra.values():
                balancer.start()
            for name, balancer in extra.items():
                balancer.wait_up([r.name for r in (every[:1] if name == "one" else every)], timeout=30)
            results: dict[str, list[dict]] = {"hash": [], "hash-200": [], "round-robin": []}
            for _ in range(ROUNDS):
                for policy in results:
                    results[policy].append(run_policy(balancers[policy], every, names, warm))
            unload_everything(every)
            hops: dict[str, list[float]] = {"direct": [], "haproxy": []}
            hop(every[0].address)  # untimed: loads the adapter, warms the path
            for _ in range(HOP_ROUNDS):
                hops["direct"].append(hop(every[0].address))
                hops["haproxy"].append(hop(balancers["one"].address))
        finally:
            for balancer in extra.values():
                balancer.stop()
    report(results, hops)


def _verdict(ratio: float, goal: float) -> str:
    return "ok" if ratio >= goal else "MISSED"


def report(results: dict[str, list[dict]], hops: dict[str, list[float]]) -> None:
    def med(policy: str, key: str) -> float:
        return statistics.median(r[key] for r in results[policy])

    rr_hit, rr_tok = med("round-robin", "hit_ratio"), med("round-robin", "tok_s")
    bound = lru_bound()
    print(
        f"LRU bound (simulated, steady state, no spill-over): hashing {bound[0]:.1%}, round-robin {bound[1]:.1%}: "
        f"{bound[0] / bound[1]:.2f}x"
    )
    head = f"{'policy':14s}{'hit ratio':>10s}{'vs rr':>8s}  goal >= 2x{'tokens/s':>11s}{'vs rr':>8s}  goal >= 1.2x"
    print(head)
    for policy in results:
        hit, tok = med(policy, "hit_ratio"), med(policy, "tok_s")
        hit_x, tok_x = hit / rr_hit, tok / rr_tok
        marks = ("", "") if policy == "round-robin" else (_verdict(hit_x, 2), _verdict(tok_x, 1.2))
        print(f"{policy:14s}{hit:>10.1%}{hit_x:>7.2f}x  {marks[0]:10s}{tok:>11.1f}{tok_x:>7.2f}x  {marks[1]}")
    for policy in results:
        for i, r in enumerate(results[policy]):
            calls = "/".join(map(str, r["served"]))
            print(f"  {policy}, round {i + 1}: {r['tok_s']:.1f} tok/s, hits {r['hit_ratio']:.1%}, calls {calls}")
    direct, via = statistics.median(hops["direct"]), statistics.median(hops["haproxy"])
    cost = 1 - via / direct
    print(
        f"HAProxy hop, one replica, {HOP_STREAMS} streams x {HOP_TOKENS} tokens (median of {HOP_ROUNDS}): "
        f"{via:.1f} tok/s through HAProxy vs {direct:.1f} direct: cost {cost:+.1%} (goal <= 5%) "
        f"{'ok' if cost <= 0.05 else 'MISSED'}"
    )
    rounds = ", ".join(f"{v:.1f}" for v in hops["direct"]), ", ".join(f"{v:.1f}" for v in hops["haproxy"])
    print(f"  rounds: direct {rounds[0]}; through HAProxy {rounds[1]}")


if __name__ == "__main__":
    main()
