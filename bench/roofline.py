"""How fast this machine streams weights, and what that allows the adapter ratios of bench/engine.py.

A decode step reads every base weight once and, for each row, its own adapter's A and B: adapter bytes grow
with the number of distinct adapters in the batch. With fp32 r=16 adapters on all seven projections of a
hidden-512 model, one adapter is 4% of the base's bytes, so 8 distinct adapters add a third to the bytes a
step reads, and 64 add 2.7x. This module measures the rates at which weights stream from DRAM (a plain
reduction, the ceiling; the GEMM the engine runs on the base; the gather-bmm that applies per-row adapters),
each over far more bytes than the 32 MB cache holds, and turns them into upper bounds on the ratios.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from loramux.core.model.linear_kernels import OneDnnLinear
from loramux.core.model.native_linear import native_linear

WORKING_SET = 256 * 2**20  # bytes cycled through per measurement: 8x the L3 cache
ROWS, RANK = 8, 16


def adapter_bytes(path: Path) -> int:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())  # fp32, as loaded


def base_linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def _rate(step: Callable[[int], object], bytes_per_call: int, calls: int) -> float:
    """GB/s of step(i) cycling over ``calls`` distinct operands (median of 5 passes after a warm-up)."""
    passes = []
    for _ in range(6):
        start = time.perf_counter()
        for i in range(calls):
            step(i)
        passes.append(time.perf_counter() - start)
    return bytes_per_call * calls / statistics.median(passes[1:]) / 1e9


def stream_rates() -> dict[str, float]:
    """GB/s: "sum" (DRAM ceiling), "gemm" (oneDNN linear, 8 rows x 512->1376), "mkl" (torch's F.linear, the
    same), "native" (the native linear kernel, the same; absent where it cannot run), and "lora8" / "lora64"
    (per-row A/B bmm at 8 and 64 rows: larger stacks stream faster, so each case is bounded at its own batch
    size)."""
    big = torch.randn(WORKING_SET // 4)
    layers = [OneDnnLinear(512, 1376, bias=False) for _ in range(WORKING_SET // (1376 * 512 * 4))]
    x = torch.randn(ROWS, 512)

    def gemm(i: int) -> object:
        return layers[i](x)

    native = native_linear()

    with torch.no_grad():
        rates = {
            "sum": _rate(lambda _: big.sum(), big.numel() * 4, 1),
            "gemm": _rate(gemm, 1376 * 512 * 4, len(layers)),
            "mkl": _rate(lambda i: F.linear(x, layers[i].weight), 1376 * 512 * 4, len(layers)),
        }
        if not isinstance(native, str):
            rates["native"] = _rate(lambda i: native(x, layers[i].weight, None), 1376 * 512 * 4, len(layers))
        for rows in (8, 64):
            rates[f"lora{rows}"] = _lora_rate(rows)
    return rates


def _lora_rate(rows: int) -> float:
    per_stack = rows * RANK * (512 + 1376) * 4
    stacks = [(torch.randn(rows, 512, RANK), torch.randn(rows, RANK, 1376)) for _ in range(WORKING_SET // per_stack)]
    x3, out = torch.randn(rows, 1, 512), torch.randn(rows, 1, 1376)

    def lora(i: int) -> object:
        a, b = stacks[i]
        return out.baddbmm_(torch.bmm(x3, a), b)  # as loramux.core.lora.routing: in place into the base output

    return _rate(lora, per_stack, len(stacks))


def ratio_bound(tokens_per_s_without: float, adapter_bytes_per_token: float, gb_per_s: float) -> float:
    """Best ratio if everything but reading each row's adapter cost what it costs without distinct adapters."""
    seconds_without = 1 / tokens_per_s_without
    return seconds_without / (seconds_without + adapter_bytes_per_token / (gb_per_s * 1e9))


def streaming_bound(rows: int, weight_bytes: int, gb_per_s: float) -> float:
    """Tokens/s of a decode at ``rows`` rows if each step cost only reading ``weight_bytes`` once at ``gb_per_s``."""
    return rows * gb_per_s * 1e9 / weight_bytes
