"""bfloat16 on CPU: the engine with the base model's weights in bf16 vs the same engine in fp32, side by side.

    make bench-bf16         # or: python -m bench.bf16   (not in `make bench`: a question for CPUs with bf16)

Issue #13 asks for a `--dtype bfloat16` fast path on CPUs with AMX or AVX-512-BF16: half the weight bytes a
decode step streams, with fp32 accumulation. The workload is bench.engine's (its model, adapters, rows and
tokens, fresh engines built on threads that end first, interleaved rounds, medians); the adapters load as
PEFT loads them by default (`autocast_adapter_dtype=True`: fp32 beside a bf16 base), and once more in bf16
(`autocast_adapter_dtype=False`). It prints the CPU, what `--linear-kernel auto` measured and chose for each dtype,
tokens/s, the bf16 / fp32 ratio of each case and what the adapters cost in each dtype.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from bench.common import bpe_tokenizer, cpu_model, llama_512, make_adapters
from bench.engine import ROUNDS, ROWS, engine_case, in_fresh_thread, measure, report_kernel_choice
from loramux.core import AdapterSelection

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        base = in_fresh_thread(llama_512)
        paths = in_fresh_thread(lambda: make_adapters(base, Path(tmp)))
        tok = bpe_tokenizer(8192)
        bases = {name: in_fresh_thread(lambda d=dtype: copy.deepcopy(base).to(d)) for name, dtype in DTYPES.items()}
        print(f"== bench.bf16 on {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
        for name, model in bases.items():
            in_fresh_thread(lambda m=model, n=name: report_kernel_choice(m, tok, label=f"{n}, "))
        base_rows = lambda n: lambda _: [AdapterSelection.BASE] * n  # noqa: E731
        cases = {}
        for name, model in bases.items():
            cases[f"{name}, 8 rows, no adapters"] = engine_case(model, tok, [], base_rows(ROWS))
            cases[f"{name}, 8 rows, 8 distinct adapters"] = engine_case(model, tok, paths, lambda names: names)
            cases[f"{name}, 64 rows, no adapters"] = engine_case(model, tok, [], base_rows(64))
        cases["bf16, 8 rows, 8 distinct bf16 adapters"] = engine_case(
            bases["bf16"], tok, paths, lambda names: names, autocast_adapter_dtype=False
        )
        tput = measure(cases)
    print(f"== throughput, generated tokens/s (median of {ROUNDS} interleaved rounds)")
    for name, value in tput.items():
        print(f"{name:<36} {value:8.1f}")
    print("== bf16 vs fp32")
    for case in ("8 rows, no adapters", "8 rows, 8 distinct adapters", "64 rows, no adapters"):
        print(f"{case:<36} {tput[f'bf16, {case}'] / tput[f'fp32, {case}']:6.2f}x")
    print("== 8 distinct adapters vs none, same dtype")
    for name, case in (
        ("fp32", "8 distinct adapters"),
        ("bf16", "8 distinct adapters"),
        ("bf16", "8 distinct bf16 adapters"),
    ):
        print(
            f"{name + ', ' + case:<36} {tput[f'{name}, 8 rows, {case}'] / tput[f'{name}, 8 rows, no adapters']:6.2f}x"
        )


if __name__ == "__main__":
    main()
