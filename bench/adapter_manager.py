"""Adapter-manager benchmark: load time, set-default time, and per-forward overhead, side by side in one run.

    make bench-adapters        # or: python -m bench.adapter_manager

Model: Llama-shaped, hidden 512, 8 layers, vocab 8192, random weights; 8 adapters r=16 on all seven
projections, built with the peft oracle into a temporary folder. Ratios are measured in one process with
interleaved rounds, because the machine is noisy.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from bench.common import N_ADAPTERS, llama_512, make_adapters, median_time
from loramux.core import AdapterManager


def bench_load(base: LlamaForCausalLM, paths: list[Path]) -> tuple[float, float]:
    from peft import PeftModel

    ours_times, peft_times = [], []
    manager = AdapterManager(copy.deepcopy(base))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="warm")
    for i, path in enumerate(paths):  # interleaved: one of ours, one of PEFT's
        start = time.perf_counter()
        manager.load_adapter(str(path), f"a{i}")
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        peft_model.load_adapter(str(path), f"a{i}")
        peft_times.append(time.perf_counter() - start)
    return statistics.median(ours_times), statistics.median(peft_times)


def bench_set_default(base: LlamaForCausalLM, path: Path) -> dict[int, float]:
    manager = AdapterManager(copy.deepcopy(base), max_adapters=128)
    results: dict[int, float] = {}
    loaded = 0
    for count in (1, 10, 100):
        while loaded < count:
            manager.load_adapter(str(path), f"copy{loaded}")
            loaded += 1
        names = [f"copy{i}" for i in range(count)]
        cycle = iter(names * 1000)
        results[count] = median_time(lambda c=cycle: manager.set_adapter(next(c)), repeats=1000)
    return results


def bench_forward(base: LlamaForCausalLM, paths: list[Path]) -> dict[str, float]:
    from peft import PeftModel

    pristine = copy.deepcopy(base)
    wrapped = copy.deepcopy(base)
    manager = AdapterManager(wrapped)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for name, path in zip(names, paths, strict=True):
        manager.load_adapter(str(path), name)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name=names[0]).eval()
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft_model.load_adapter(str(path), name)

    torch.manual_seed(1)
    prompt = torch.randint(0, 8192, (N_ADAPTERS, 32))
    step_ids = torch.randint(0, 8192, (N_ADAPTERS, 1))
    held = [manager.acquire(n) for n in names]
    plan = manager.plan(held)
    plan_build = median_time(lambda: manager.plan(held), repeats=5)

    from loramux.core.lora.routing import use_plan

    def prefill(model: torch.nn.Module, **kw: object) -> Callable[[], object]:
        return lambda: model(prompt, use_cache=False, **kw)

    def decode(model: torch.nn.Module, **kw: object) -> Callable[[], object]:
        cache = model(prompt, use_cache=True, **kw).past_key_values

        def step() -> object:
            out = model(step_ids, past_key_values=cache, use_cache=True, **kw)
            cache.crop(-1)  # back to the prompt: every step sees the same cache length
            return out

        return step

    def routed(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with use_plan(plan):
                return fn()

        return run

    with torch.no_grad():
        with use_plan(plan):
            decode_ours = decode(wrapped)
        steps = {
            "prefill base": prefill(pristine),
            "prefill loramux 8 adapters": routed(prefill(wrapped)),
            "prefill peft mixed 8 adapters": prefill(peft_model, adapter_names=names),
            "decode base": decode(pristine),
            "decode loramux 8 adapters": routed(decode_ours),
            "decode peft mixed 8 adapters": decode(peft_model, adapter_names=names),
        }
        samples: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(7):
            for name, fn in steps.items():
                samples[name].append(median_time(fn, repeats=5))
    result = {k: statistics.median(v) for k, v in samples.items()}
    result["plan build"] = plan_build
    return result


def main() -> None:
    torch.set_num_threads(2)
    base = llama_512()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, Path(tmp))
        ours, theirs = bench_load(base, paths)
        print("== load (median per adapter, 8 adapters r=16 on 7 projections x 8 layers)")
        print(
            f"loramux {ours * 1e3:8.1f} ms   peft load_adapter {theirs * 1e3:8.1f} ms   "
            f"ratio {ours / theirs:.3f}x (goal <= 0.25x)"
        )
        set_default = bench_set_default(base, paths[0])
        print("== set default adapter (median)")
        for count, seconds in set_default.items():
            print(f"{count:4d} adapters loaded: {seconds * 1e6:7.2f} µs (goal < 1000 µs, flat)")
        print(f"flatness 100 vs 1: {set_default[100] / set_default[1]:.2f}x")
        forward = bench_forward(base, paths)
    print("== forward, batch of 8 rows, each row a different adapter (median)")
    for phase in ("prefill", "decode"):
        base_t = forward[f"{phase} base"]
        ours_t = forward[f"{phase} loramux 8 adapters"]
        peft_t = forward[f"{phase} peft mixed 8 adapters"]
        print(
            f"{phase:8} base {base_t * 1e3:7.2f} ms  loramux {ours_t * 1e3:7.2f} ms  peft {peft_t * 1e3:7.2f} ms  "
            f"overhead {100 * (ours_t / base_t - 1):5.1f}% (goal <= 15%)  "
            f"peft overhead {100 * (peft_t / base_t - 1):5.1f}%"
        )
    print(f"routing plan build (once per batch composition): {forward['plan build'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
