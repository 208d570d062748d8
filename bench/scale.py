"""Adapters at platform scale: 1,000 adapters on disk, a budget of 64 resident, Zipf(1.0) traffic.

    make bench-scale        # or: python -m bench.scale   (part of `make bench`)

Workload (issue #12): the bench's Llama-shaped model (hidden 512, 8 layers); 1,000 adapters r=16 on all seven
projections in one adapter root (one made by PEFT, the others clones with their own random weights; built
once under build/bench-scale/ and reused); 512 requests whose adapters follow Zipf(s=1.0) over the 1,000 (a
seeded draw), 32 in flight (each finished request is replaced by the next of the sequence), 32 prompt and 32
new tokens, greedy, ignore_eos. Two cases, each in a fresh process, interleaved over ROUNDS rounds:

* ``budget``: load on demand from the root with a budget of 64 resident adapters (``--load-on-demand
  --adapter-root ROOT --max-adapters 64``): adapters load on first use and the least recently used unused
  ones are evicted;
* ``preloaded``: every adapter the sequence touches is loaded before the run, with no budget.

Reported: throughput of ``budget`` vs ``preloaded`` (goal >= 0.7x), the resident hit ratio, time to first token
p50/p99, and the peak RSS of the ``budget`` process against its base (the model and engine, warm, before any
adapter) plus the budget (64 adapters' bytes) (goal: at most +10 %). Both cases first serve one untimed batch
of 32 rows on 32 adapters outside the sequence (then unloaded; the base is read once the engine has let go of
those rows), so the base includes what a server that has served a full batch keeps (its routing workspace;
oneDNN's kernels for every decode row count, which the engine builds at start), not the KV of rows that have
finished. The prefix cache is off in both: the prompts are
random and share nothing, and the cache is a budget of its own (``--prefix-cache-memory``, bench/prefix.py),
which would otherwise fill with prompts no one reuses and count against the adapters' budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.common import PROJECTIONS, bpe_tokenizer, cpu_model, llama_512, make_adapters
from bench.engine import in_fresh_thread
from loramux.core import AdapterManager, Engine, EngineConfig, GenerationRequest, TokenDelta
from loramux.core.adapters.on_demand import OnDemand

N_ADAPTERS, BUDGET, REQUESTS, IN_FLIGHT, PROMPT_TOKENS, NEW_TOKENS, ROUNDS = 1000, 64, 512, 32, 32, 32, 3
WARM_ADAPTERS = 32  # outside the sequence's 1,000: the untimed warm-up batch
WORKDIR = Path("build/bench-scale")


def farm(workdir: Path, count: int = N_ADAPTERS + WARM_ADAPTERS) -> Path:
    """workdir/adapters/a0000 ...: ``count`` adapters, one made by PEFT and the others clones with their own
    random weights, and workdir/tokenizer (built once). Here 1,000 for the sequence and 32 for the warm-up."""
    root = workdir / "adapters"
    done = root / ".complete"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    bpe_tokenizer(8192).save_pretrained(workdir / "tokenizer")  # trained once; each case's process loads it
    template = make_adapters(llama_512(), workdir / "template", count=1)[0]
    config = (template / "adapter_config.json").read_text()
    assert sorted(json.loads(config)["target_modules"]) == sorted(PROJECTIONS)
    state = load_file(str(template / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(11)
    for i in range(count):
        folder = root / f"a{i:04d}"
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text(config)
        tensors = {k: torch.randn(v.shape, generator=generator) * float(v.std()) for k, v in state.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    done.write_text("ok")
    return root


def zipf(names: list[str], count: int, *, seed: int = 7) -> list[str]:
    """``count`` draws of Zipf(1.0) over ``names`` (rank k drawn with probability ~ 1/k; which name gets which
    rank is a seeded shuffle: which adapter is hot is arbitrary)."""
    rng = random.Random(seed)
    ranked = list(names)
    rng.shuffle(ranked)
    weights = [1 / (k + 1) for k in range(len(ranked))]
    return rng.choices(ranked, weights=weights, k=count)


def sequence() -> list[str]:
    """The 512 requests' adapters: Zipf(1.0) over the 1,000."""
    return zipf([f"a{i:04d}" for i in range(N_ADAPTERS)], REQUESTS)


def prompts(count: int, seed: int) -> list[list[int]]:
    return torch.randint(1, 8192, (count, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed)).tolist()


def rss(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def settle(engine: Engine, timeout: float = 30.0) -> None:
    """Wait until the engine has let go of the warm-up's rows (clients see the last event a step before the
    engine drops the row and its KV), so the base is measured in the same state every time."""
    deadline = time.monotonic() + timeout
    while engine.running_rows or engine.queued:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine still holds {engine.running_rows} rows after the warm-up")
        time.sleep(0.01)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current VmRSS


async def closed_loop(engine: Engine, names: list[str], tokens: list[list[int]]) -> tuple[float, list[float]]:
    """Keep IN_FLIGHT requests running until every one of ``names`` is served; (seconds, TTFTs)."""
    pending = iter(range(len(names)))
    ttfts: list[float] = [0.0] * len(names)

    async def worker() -> None:
        for i in pending:
            start = time.perf_counter()
            request = GenerationRequest(prompt=tokens[i], adapter=names[i], max_new_tokens=NEW_TOKENS, ignore_eos=True)
            count = 0
            async for event in engine.submit(request):
                if isinstance(event, TokenDelta):
                    if count == 0:
                        ttfts[i] = time.perf_counter() - start
                    count += len(event.token_ids)
            assert count == NEW_TOKENS, count

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return time.perf_counter() - start, ttfts


def run_case(case: str, root: Path) -> dict:
    """One case in this (fresh) process; the result as a JSON-able dict."""
    torch.set_num_threads(2)
    # every torch op on threads that end (bench.engine.in_fresh_thread): a live OpenMP pool on this main
    # thread beside the engine's made its decode steps ~30 % slower on 2 cores (BENCHMARKS.md, session 8)
    names = sequence()
    engine, manager = in_fresh_thread(lambda: build(case, root, names))
    try:
        warm = [f"a{N_ADAPTERS + i:04d}" for i in range(WARM_ADAPTERS)]
        in_fresh_thread(lambda: [manager.load_adapter(str(root / name), name) for name in warm])
        asyncio.run(closed_loop(engine, warm, in_fresh_thread(lambda: prompts(WARM_ADAPTERS, seed=1))))
        in_fresh_thread(lambda: [manager.unload_adapter(name) for name in warm])
        settle(engine)
        base_rss = rss("VmRSS")
        reset_peak_rss()
        hits0, misses0 = manager.stats.hits, manager.stats.misses
        tokens = in_fresh_thread(lambda: prompts(REQUESTS, seed=2))
        seconds, ttfts = asyncio.run(closed_loop(engine, names, tokens))
        peak = rss("VmHWM")
        hits, misses = manager.stats.hits - hits0, manager.stats.misses - misses0
        adapter_bytes = manager.get_adapter(names[0]).size_bytes
    finally:
        engine.close()
    ttfts.sort()
    return {
        "case": case,
        "tok_s": REQUESTS * NEW_TOKENS / seconds,
        "hit_ratio": hits / (hits + misses),
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[int(0.99 * (len(ttfts) - 1))],
        "base_rss": base_rss,
        "peak_rss": peak,
        "budget_bytes": BUDGET * adapter_bytes,
        "distinct": len(set(names)),
        # each process times the kernels itself (--linear-kernel auto): a different choice moves its steps
        "kernels": engine.kernel_choice.summary if engine.kernel_choice is not None else engine.linear_kernel.value,
    }


def build(case: str, root: Path, names: list[str]) -> tuple[Engine, AdapterManager]:
    """The case's engine and manager: on demand with the budget, or every adapter of ``names`` loaded."""
    from transformers import AutoTokenizer

    model, tokenizer = llama_512(), AutoTokenizer.from_pretrained(root.parent / "tokenizer")
    if case == "budget":
        manager = AdapterManager(model, max_adapters=BUDGET, on_demand=OnDemand(roots=[root], allow_hub=False))
    else:
        touched = sorted(set(names))
        manager = AdapterManager(model, max_adapters=len(touched) + WARM_ADAPTERS)
        for name in touched:
            manager.load_adapter(str(root / name), name)
    config = EngineConfig(max_batch_rows=IN_FLIGHT, max_queued=REQUESTS, prefix_cache_bytes=0)
    return Engine(model, tokenizer, manager, config), manager


def in_subprocess(case: str, root: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.scale", "--case", case, "--root", str(root)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("budget", "preloaded"), help="run one case here (internal)")
    parser.add_argument("--root", type=Path, help="the adapter root (internal)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.root)))
        return
    print(f"== bench.scale on {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}")
    root = farm(WORKDIR)
    names = sequence()
    print(
        f"{N_ADAPTERS} adapters on disk, {REQUESTS} requests (Zipf 1.0, {len(set(names))} distinct), "
        f"{IN_FLIGHT} in flight, {PROMPT_TOKENS}+{NEW_TOKENS} tokens, budget {BUDGET} resident"
    )
    results: dict[str, list[dict]] = {"budget": [], "preloaded": []}
    for _ in range(ROUNDS):
        for case in ("budget", "preloaded"):
            results[case].append(in_subprocess(case, root))
    budget, preloaded = results["budget"], results["preloaded"]

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    for i, (b, p) in enumerate(zip(budget, preloaded, strict=True)):
        print(
            f"round {i + 1}: budget {b['tok_s']:.1f}, preloaded {p['tok_s']:.1f} tokens/s: "
            f"{b['tok_s'] / p['tok_s']:.2f}x (kernels: budget {b['kernels']}; preloaded {p['kernels']})"
        )
    ratio = med(budget, "tok_s") / med(preloaded, "tok_s")
    verdict = "ok" if ratio >= 0.7 else "MISSED"
    print(
        f"throughput, tokens/s (median of {ROUNDS}): budget {med(budget, 'tok_s'):.1f}, "
        f"preloaded {med(preloaded, 'tok_s'):.1f}, ratio {ratio:.2f}x (goal >= 0.7x) {verdict}"
    )
    print(f"resident hit ratio with the budget: {med(budget, 'hit_ratio'):.1%}")
    for case, rows in results.items():
        print(
            f"time to first token, {case:9s}: p50 {med(rows, 'ttft_p50') * 1000:7.1f} ms, "
            f"p99 {med(rows, 'ttft_p99') * 1000:7.1f} ms"
        )
    base, peak, allowed = med(budget, "base_rss"), med(budget, "peak_rss"), med(budget, "budget_bytes")
    over = peak / (base + allowed) - 1
    print(
        f"peak RSS with the budget: {peak / 2**20:.0f} MiB vs base {base / 2**20:.0f} MiB + budget "
        f"{allowed / 2**20:.0f} MiB: {over:+.1%} (goal <= +10%) {'ok' if over <= 0.10 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
