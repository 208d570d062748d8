"""Engine benchmark: throughput ratios measured side by side in one run, and latency under load.

    make bench-engine       # or: python -m bench.engine   (part of `make bench`)

Workload (issue #3): Llama-shaped model (hidden 512, 8 layers, vocab 8192), adapters r=16 on all seven
projections; 8 concurrent requests of 32 prompt tokens, 64 new tokens each, greedy, ignore_eos. Each
configuration runs ROUNDS times, interleaved with the others; the median throughput is compared.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from bench import roofline
from bench.common import bpe_tokenizer, clone_adapters, cpu_model, llama_512, make_adapters
from loramux.core import AdapterManager, AdapterSelection, Engine, EngineConfig, GenerationRequest, TokenDelta
from loramux.core.lora.kernel_choice import LoraKernel
from loramux.core.model.linear_kernels import LinearKernel
from loramux.core.model.native_layers import DecodeLayers
from loramux.core.model.native_linear import native_linear

PROMPT_TOKENS, NEW_TOKENS, ROWS, ROUNDS = 32, 64, 8, 5
FIXED = ("torch GEMM (MKL)", "oneDNN GEMM", "native GEMM")  # the cases on one fixed linear kernel


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(1, 8192, (count, PROMPT_TOKENS), generator=generator).tolist()


def run_engine(
    engine: Engine, adapters: list[str | AdapterSelection], *, latencies: dict | None = None, **extra: object
) -> float:
    """Submit one request per adapter entry at once (``extra``: more GenerationRequest fields); returns generated
    tokens per second."""
    start = time.perf_counter()
    channels = [
        engine.submit(GenerationRequest(prompt=p, adapter=a, max_new_tokens=NEW_TOKENS, ignore_eos=True, **extra))  # type: ignore[arg-type]
        for p, a in zip(prompts(len(adapters)), adapters, strict=True)
    ]
    stamps: list[list[float]] = [[] for _ in channels]

    async def consume(i: int) -> None:  # one event loop consumes every stream, as the aio server does
        async for event in channels[i]:
            if isinstance(event, TokenDelta):
                stamps[i].append(time.perf_counter())

    async def consume_all() -> None:
        await asyncio.gather(*(consume(i) for i in range(len(channels))))

    asyncio.run(consume_all())
    elapsed = time.perf_counter() - start
    assert all(len(s) == NEW_TOKENS for s in stamps), "every request streams one event per token"
    if latencies is not None:
        latencies.setdefault("ttft", []).extend(s[0] - start for s in stamps)
        latencies.setdefault("itl", []).extend(b - a for s in stamps for a, b in itertools.pairwise(s))
    return len(adapters) * NEW_TOKENS / elapsed


def hf_generate(model: torch.nn.Module, **kwargs: object) -> Callable[[], float]:
    ids = torch.tensor(prompts(ROWS))

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs
            )
        return ROWS * NEW_TOKENS / (time.perf_counter() - start)

    return run


def peft_sequential(peft_model, names: list[str]) -> Callable[[], float]:
    rows = prompts(ROWS)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for name, prompt in zip(names, rows, strict=True):
                peft_model.set_adapter(name)
                peft_model.generate(
                    input_ids=torch.tensor([prompt]),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )
        return ROWS * NEW_TOKENS / (time.perf_counter() - start)

    return run


def engine_with(
    base,
    tokenizer,
    paths: list[Path],
    *,
    max_rows: int,
    kernel: LinearKernel = LinearKernel.AUTO,
    lean: bool = True,
    autocast_adapter_dtype: bool = True,
    lora_kernel: LoraKernel = LoraKernel.AUTO,
    decode_layers: DecodeLayers = DecodeLayers.AUTO,
) -> tuple[Engine, list[str]]:
    model = copy.deepcopy(base)
    manager = AdapterManager(model, max_adapters=max(len(paths), 1))
    names = []
    for i, path in enumerate(paths):
        manager.load_adapter(str(path), f"a{i}", autocast_adapter_dtype=autocast_adapter_dtype)
        names.append(f"a{i}")
    config = EngineConfig(
        max_batch_rows=max_rows,
        linear_kernel=kernel,
        lean_decode_step=lean,
        lora_kernel=lora_kernel,
        decode_layers=decode_layers,
    )
    return Engine(model, tokenizer, manager, config), names


T = TypeVar("T")


def in_fresh_thread(fn: Callable[[], T]) -> T:
    """Run fn on a new thread that ends with it. Every thread that runs torch ops keeps an OpenMP pool
    for its life; two live pools on 2 cores throttle each other (libgomp stops spin-waiting), which would
    slow whichever case runs beside a lingering one. The service keeps torch work on the engine thread and
    short-lived threads for the same reason (service/runtime.py)."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def engine_case(
    base,
    tokenizer,
    paths: list[Path],
    pick: Callable[[list[str]], list],
    *,
    kernel: LinearKernel = LinearKernel.AUTO,
    lean: bool = True,
    autocast_adapter_dtype: bool = True,
    lora_kernel: LoraKernel = LoraKernel.AUTO,
    decode_layers: DecodeLayers = DecodeLayers.AUTO,
    **extra: object,
) -> Callable[[], float]:
    """A fresh engine per run (closed after it, so its thread and pool end); pick chooses each row's adapter.

    Each engine serves the same batch once untimed before the timed run, as a running server is warm: the
    transformers and peft cases run on models that stay warm across rounds, while a fresh engine's first
    batch pays the engine thread's first-touch page faults (its KV cache, the routing stacks: 15-30 ms at 8
    distinct adapters) and oneDNN's first calls. Nothing of the warm-up batch is kept: its rows, KV cache and
    routing plan are dropped when it finishes, and the timed batch builds its own."""

    def run(latencies: dict | None = None) -> float:
        # Built on a thread that ends before the run, so the engine thread holds the only OpenMP pool.
        build = lambda: engine_with(  # noqa: E731
            base,
            tokenizer,
            paths,
            max_rows=64,
            kernel=kernel,
            lean=lean,
            autocast_adapter_dtype=autocast_adapter_dtype,
            lora_kernel=lora_kernel,
            decode_layers=decode_layers,
        )
        engine, names = in_fresh_thread(build)
        try:
            run_engine(engine, pick(names), **extra)  # warm-up, untimed
            return run_engine(engine, pick(names), latencies=latencies, **extra)
        finally:
            engine.close()

    return run


def report_kernel_choice(base, tokenizer, *, label: str = "") -> None:
    """What ``--linear-kernel auto`` (the engines' default here) measures and chooses on this machine: one
    engine's start, as every engine of the bench makes its own (the choice can differ by noise at a near-tie).
    Built on a thread that ends first, as engine_case does: a second live OpenMP pool slowed torch's LoRA ops
    timed at start 3-10x (the LoRA kernel's cells)."""
    engine, _ = in_fresh_thread(lambda: engine_with(base, tokenizer, [], max_rows=64))
    try:
        choice, layers = engine.kernel_choice, engine.decoder.native_choice
    finally:
        engine.close()
    chosen = choice.summary if choice else engine.linear_kernel.value
    print(f"== linear kernels, {label}--linear-kernel auto: {chosen}", flush=True)
    if choice is not None:
        print(choice.describe())
    print(f"== decode layers, {label}--decode-layers auto: {layers if isinstance(layers, str) else layers.describe()}")
    print(f"== LoRA kernel, {label}--lora-kernel auto:")
    print(engine.lora_kernel.describe(), flush=True)


def measure(cases: dict[str, Callable[[], float]]) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for case in cases.values():
        in_fresh_thread(case)  # warm-up
    for _ in range(ROUNDS):
        for name, case in cases.items():
            samples[name].append(in_fresh_thread(case))
    return {k: statistics.median(v) for k, v in samples.items()}


def setup(tmp: Path) -> dict:
    from peft import PeftModel

    base = llama_512()
    paths = make_adapters(base, tmp)
    names = [f"a{i}" for i in range(len(paths))]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name=names[0]).eval()
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft_model.load_adapter(str(path), name)
    return {
        "base": base,
        "tokenizer": bpe_tokenizer(8192),
        "paths": paths,
        "names": names,
        "clones": clone_adapters(paths[0], tmp / "clones", 64),
        "peft": peft_model,
    }


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        s = in_fresh_thread(lambda: setup(Path(tmp)))  # the main thread never runs torch ops
        base, tok = s["base"], s["tokenizer"]
        print(f"== bench.engine on {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
        in_fresh_thread(lambda: report_kernel_choice(base, tok))
        tput = measure(
            {
                "engine 8 distinct adapters": engine_case(base, tok, s["paths"], lambda names: names),
                "engine 8 distinct adapters, logprobs top-5": engine_case(
                    base, tok, s["paths"], lambda names: names, logprobs=True, top_logprobs=5
                ),
                "engine no adapters": engine_case(base, tok, [], lambda _: [AdapterSelection.BASE] * ROWS),
                "engine no adapters, torch GEMM (MKL)": engine_case(
                    base, tok, [], lambda _: [AdapterSelection.BASE] * ROWS, kernel=LinearKernel.TORCH
                ),
                "engine no adapters, oneDNN GEMM": engine_case(
                    base, tok, [], lambda _: [AdapterSelection.BASE] * ROWS, kernel=LinearKernel.ONEDNN
                ),
                **(
                    {}
                    if isinstance(native_linear(), str)
                    else {
                        "engine no adapters, native GEMM": engine_case(
                            base, tok, [], lambda _: [AdapterSelection.BASE] * ROWS, kernel=LinearKernel.NATIVE
                        )
                    }
                ),
                "engine no adapters, torch's decode layers": engine_case(
                    base, tok, [], lambda _: [AdapterSelection.BASE] * ROWS, decode_layers=DecodeLayers.TORCH
                ),
                "engine no adapters, transformers forward": engine_case(
                    base, tok, [], lambda _: [AdapterSelection.BASE] * ROWS, lean=False
                ),
                "transformers generate": hf_generate(base),
                "peft mixed-batch generate": hf_generate(s["peft"], adapter_names=s["names"]),
                "peft sequential set_adapter+generate": peft_sequential(s["peft"], s["names"]),
            }
        )
        latencies: dict[str, list[float]] = {}
        distinct64 = engine_case(base, tok, s["clones"], lambda names: names)
        runs = iter(range(ROUNDS + 1))
        tput64 = measure(
            {  # latencies from the measured rounds only, not the warm-up
                "64 requests, 64 distinct adapters": lambda: distinct64(latencies if next(runs) else None),
                "64 requests, one shared adapter": engine_case(base, tok, s["clones"], lambda names: [names[0]] * 64),
                "64 requests, 8 adapters (8 rows each)": engine_case(
                    base, tok, s["clones"][:8], lambda names: [names[i % 8] for i in range(64)]
                ),
                "64 requests, 8 adapters, torch's LoRA ops": engine_case(
                    base,
                    tok,
                    s["clones"][:8],
                    lambda names: [names[i % 8] for i in range(64)],
                    lora_kernel=LoraKernel.TORCH,
                ),
                "64 requests, no adapters": engine_case(base, tok, [], lambda _: [AdapterSelection.BASE] * 64),
            }
        )
        rates = in_fresh_thread(roofline.stream_rates)
        traffic = {"base": roofline.base_linear_bytes(base), "adapter": roofline.adapter_bytes(s["paths"][0])}
    report(tput, tput64, latencies)
    report_roofline(tput, tput64, rates, traffic)


def report(tput: dict[str, float], tput64: dict[str, float], latencies: dict[str, list[float]]) -> None:
    print(f"== throughput, generated tokens/s (median of {ROUNDS} interleaved rounds)")
    for name, value in {**tput, **tput64}.items():
        print(f"{name:40} {value:8.1f}")
    ours, bare = tput["engine 8 distinct adapters"], tput["engine no adapters"]
    ratios = [
        ("8 distinct adapters vs engine without adapters", ours / bare, 0.85),
        ("engine without adapters vs transformers generate", bare / tput["transformers generate"], 1.3),
        (
            "kernel auto vs the faster fixed kernel (no adapters)",
            bare / max(v for k, v in tput.items() if k.startswith("engine no adapters, ") and k.endswith(FIXED)),
            0.95,
        ),
        ("8 distinct adapters vs peft mixed-batch generate", ours / tput["peft mixed-batch generate"], 3.5),
        ("8 distinct adapters vs peft sequential", ours / tput["peft sequential set_adapter+generate"], 6.0),
        (
            "logprobs top-5 on every request vs none (8 rows)",
            tput["engine 8 distinct adapters, logprobs top-5"] / ours,
            0.9,
        ),
        (
            "64 distinct adapters vs 64 on one adapter",
            tput64["64 requests, 64 distinct adapters"] / tput64["64 requests, one shared adapter"],
            0.8,
        ),
        (
            "64 requests over 8 adapters vs 64 without adapters",
            tput64["64 requests, 8 adapters (8 rows each)"] / tput64["64 requests, no adapters"],
            0.9,
        ),
        (
            "64 distinct adapters vs 64 without adapters",
            tput64["64 requests, 64 distinct adapters"] / tput64["64 requests, no adapters"],
            0.8,
        ),
    ]
    print("== ratios")
    for label, ratio, goal in ratios:
        print(f"{label:52} {ratio:6.2f}x  (goal >= {goal}x) {'ok' if ratio >= goal else 'MISSED'}")
    lean = bare / tput["engine no adapters, transformers forward"]
    print(f"{'decode step vs transformers forward (no adapters)':52} {lean:6.2f}x  (no goal: model.decode_step)")
    lora = tput64["64 requests, 8 adapters (8 rows each)"] / tput64["64 requests, 8 adapters, torch's LoRA ops"]
    print(f"{'64 over 8 adapters: --lora-kernel auto vs torch':52} {lora:6.2f}x  (no goal: lora.native_kernel)")
    print("== latency, 64 concurrent requests over 64 adapters")
    for key, label in (("ttft", "time to first token"), ("itl", "inter-token latency")):
        values = sorted(latencies[key])
        p50, p99 = values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"{label:22} p50 {p50 * 1e3:8.1f} ms   p99 {p99 * 1e3:8.1f} ms")


def report_roofline(
    tput: dict[str, float], tput64: dict[str, float], rates: dict[str, float], traffic: dict[str, int]
) -> None:
    base_mb, adapter_mb = traffic["base"] / 1e6, traffic["adapter"] / 1e6
    print("== weights read per decode step, and how fast this machine streams them (bench/roofline.py)")
    print(f"base linears {base_mb:.0f} MB; one adapter {adapter_mb:.1f} MB ({100 * adapter_mb / base_mb:.1f}% of base)")
    print(f"  8 rows on 8 distinct adapters: +{8 * adapter_mb:.0f} MB; 64 rows on 64: +{64 * adapter_mb:.0f} MB")
    native = f", native {rates['native']:.0f}" if "native" in rates else ""
    print(
        f"DRAM read rate: plain sum {rates['sum']:.0f} GB/s, GEMM at 8 rows: oneDNN {rates['gemm']:.0f}, "
        f"MKL {rates['mkl']:.0f}{native} GB/s; LoRA gather-bmm {rates['lora8']:.0f} GB/s at 8 rows, "
        f"{rates['lora64']:.0f} GB/s at 64 rows"
    )
    bounds = [
        ("8 distinct vs no adapters", tput["engine no adapters"], rates["lora8"], 0.85),
        ("64 distinct vs one shared", tput64["64 requests, one shared adapter"], rates["lora64"], 0.8),
    ]
    bound = roofline.streaming_bound(ROWS, traffic["base"], rates["sum"])
    ratio = tput["engine no adapters"] / bound
    verdict = "ok" if ratio >= 0.5 else "MISSED"
    print(f"weight-streaming bound at {ROWS} rows: {bound:.0f} tok/s (base linears read once a step at the sum rate)")
    print(f"engine without adapters vs that bound {ratio:.2f}x  (goal >= 0.5x) {verdict}")
    for label, without, kernel_rate, goal in bounds:
        at_kernel = roofline.ratio_bound(without, traffic["adapter"], kernel_rate)
        at_ceiling = roofline.ratio_bound(without, traffic["adapter"], rates["sum"])
        print(
            f"bound on {label:26} adapters at the LoRA kernel's rate {at_kernel:.2f}x, "
            f"at the DRAM ceiling {at_ceiling:.2f}x (goal >= {goal}x)"
        )


if __name__ == "__main__":
    main()
