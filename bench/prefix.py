"""Shared prompts prefilled once: the prefix cache on vs off, side by side.

    make bench-prefix       # or: python -m bench.prefix   (part of `make bench`)

Workload (issue #16): the bench's Llama-shaped model (hidden 512, 8 layers; 2,048 positions), 8 adapters r=16
on all seven projections, each with its own 1,024-token system prompt. Prompt tokens are random ids (seeded).

* ``shared``: REQUESTS requests, adapter i % 8, each its adapter's system prompt plus a unique 32-token
  question; 32 new tokens, greedy, ignore_eos; 8 in flight (each finished request replaced by the next).
  Time to first token p50/p99 and throughput, cache on (the default budget) vs off (``prefix_cache_bytes=0``).
  Goals: TTFT p50 >= 5x lower, throughput >= 2x higher.
* ``multi-turn``: 8 conversations (one per adapter) at once, 4 turns each; turn k sends the system prompt,
  every earlier question and answer, and question k (32 tokens); the answer (32 tokens) is what the model
  generated. TTFT per turn (median over the conversations). Goal, with the cache: turn 4 within 1.5x of
  turn 1 (turn 1 reuses the warm system prompt; turn 4 must reuse the whole conversation, answers included).

Each engine is fresh and first serves one untimed request per adapter on its system prompt (a warm server
has seen its tenants' system prompts; the cache-off engine gets the same warm-up). Cases alternate over
ROUNDS rounds; medians are reported.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import bpe_tokenizer, llama_512, make_adapters
from bench.engine import in_fresh_thread
from loramux.core import AdapterManager, Engine, EngineConfig, GenerationRequest, TokenDelta

SYSTEM, QUESTION, NEW, ADAPTERS, IN_FLIGHT, REQUESTS, TURNS, ROUNDS = 1024, 32, 32, 8, 8, 48, 4, 2
VOCAB = 8192


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def build_engine(base, tokenizer, paths: list[Path], *, cache: bool) -> Engine:
    model = copy.deepcopy(base)
    manager = AdapterManager(model, max_adapters=len(paths))
    for i, path in enumerate(paths):
        manager.load_adapter(str(path), f"a{i}")
    config = EngineConfig(
        max_batch_rows=IN_FLIGHT, max_prompt_tokens=2048, **({} if cache else {"prefix_cache_bytes": 0})
    )
    return Engine(model, tokenizer, manager, config)


async def generate(engine: Engine, prompt: list[int], adapter: str) -> tuple[float, list[int]]:
    """(time to first token, generated ids) of one request."""
    start, first, ids = time.perf_counter(), 0.0, []
    request = GenerationRequest(prompt=prompt, adapter=adapter, max_new_tokens=NEW, ignore_eos=True)
    async for event in engine.submit(request):
        if isinstance(event, TokenDelta) and event.token_ids:
            first = first or time.perf_counter() - start
            ids += event.token_ids
    assert len(ids) == NEW, len(ids)
    return first, ids


async def shared(engine: Engine, systems: list[list[int]], rng: random.Random) -> dict:
    work = iter(range(REQUESTS))
    ttfts: list[float] = []

    async def worker() -> None:
        for i in work:
            ttft, _ = await generate(engine, systems[i % ADAPTERS] + tokens(rng, QUESTION), f"a{i % ADAPTERS}")
            ttfts.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    seconds = time.perf_counter() - start
    ttfts.sort()
    return {"tok_s": REQUESTS * NEW / seconds, "p50": statistics.median(ttfts), "p99": ttfts[-1]}


async def multi_turn(engine: Engine, systems: list[list[int]], rng: random.Random) -> list[float]:
    """The median TTFT of each turn over ADAPTERS conversations run at once."""
    per_turn: list[list[float]] = [[] for _ in range(TURNS)]

    async def conversation(a: int) -> None:
        history = list(systems[a])
        for turn in range(TURNS):
            history += tokens(rng, QUESTION)
            ttft, answer = await generate(engine, history, f"a{a}")
            per_turn[turn].append(ttft)
            history += answer

    await asyncio.gather(*(conversation(a) for a in range(ADAPTERS)))
    return [statistics.median(t) for t in per_turn]


def run_round(base, tokenizer, paths: list[Path], systems: list[list[int]], *, cache: bool, seed: int) -> dict:
    engine = in_fresh_thread(lambda: build_engine(base, tokenizer, paths, cache=cache))
    try:
        rng = random.Random(seed)

        async def warm() -> None:
            await asyncio.gather(
                *(generate(engine, systems[a] + tokens(rng, QUESTION), f"a{a}") for a in range(ADAPTERS))
            )

        asyncio.run(warm())
        result = asyncio.run(shared(engine, systems, rng))
        result["turns"] = asyncio.run(multi_turn(engine, systems, rng))
        result["stats"] = engine.prefix_stats()
        return result
    finally:
        engine.close()


def main() -> None:
    torch.set_num_threads(2)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"== bench.prefix on {cpu}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"{ADAPTERS} adapters, a {SYSTEM}-token system prompt each, {QUESTION}-token questions, {NEW} new tokens, "
        f"{IN_FLIGHT} in flight; shared: {REQUESTS} requests; multi-turn: {ADAPTERS} conversations x {TURNS} turns"
    )
    # every torch op on threads that end: a live OpenMP pool on this main thread beside the engine's made
    # its decode steps ~30 % slower on 2 cores (BENCHMARKS.md, session 8)
    base, tokenizer = in_fresh_thread(lambda: (llama_512(max_positions=2048), bpe_tokenizer(VOCAB)))
    rng = random.Random(7)
    systems = [tokens(rng, SYSTEM) for _ in range(ADAPTERS)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = in_fresh_thread(lambda: make_adapters(base, Path(tmp), count=ADAPTERS))
        results: dict[bool, list[dict]] = {True: [], False: []}
        for r in range(ROUNDS):
            for cache in (True, False):
                results[cache].append(run_round(base, tokenizer, paths, systems, cache=cache, seed=100 + r))
    report(results)


def report(results: dict[bool, list[dict]]) -> None:
    def med(cache: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[cache])

    on, off = {k: med(True, k) for k in ("tok_s", "p50", "p99")}, {k: med(False, k) for k in ("tok_s", "p50", "p99")}
    print(f"== shared system prompts (median of {ROUNDS} rounds)")
    for name, row in (("cache on ", on), ("cache off", off)):
        print(
            f"{name}: {row['tok_s']:7.1f} tok/s, time to first token p50 {row['p50'] * 1000:7.1f} ms, "
            f"p99 {row['p99'] * 1000:7.1f} ms"
        )
    ttft, tput = off["p50"] / on["p50"], on["tok_s"] / off["tok_s"]
    print(f"TTFT p50 {ttft:.1f}x lower with the cache (goal >= 5x) {'ok' if ttft >= 5 else 'MISSED'}")
    print(f"throughput {tput:.2f}x with the cache (goal >= 2x) {'ok' if tput >= 2 else 'MISSED'}")
    print("== multi-turn: median time to first token per turn, ms")
    turns = {c: [statistics.median(r["turns"][t] for r in results[c]) for t in range(TURNS)] for c in (True, False)}
    for cache, label in ((True, "cache on "), (False, "cache off")):
        print(f"{label}: " + "  ".join(f"turn {t + 1} {v * 1000:7.1f}" for t, v in enumerate(turns[cache])))
    ratio = turns[True][-1] / turns[True][0]
    print(f"turn {TURNS} vs turn 1 with the cache: {ratio:.2f}x (goal <= 1.5x) {'ok' if ratio <= 1.5 else 'MISSED'}")
    stats = results[True][-1]["stats"]
    print(
        f"cache (last round): {stats.hits}/{stats.lookups} prompts reused blocks, {stats.hit_tokens}/"
        f"{stats.lookup_tokens} prompt tokens not prefilled, {stats.bytes / 2**20:.0f} MiB of "
        f"{stats.max_bytes / 2**20:.0f} MiB, {stats.evictions} blocks evicted"
    )


if __name__ == "__main__":
    main()
