"""The linear layers of one decode step on each linear kernel, side by side (what --linear-kernel chooses from).

    make bench-linear       # or: python -m bench.linear_kernels   (part of `make bench`; seconds)

The bench model's 33 linears (8 layers of fused q/k/v, o, fused gate/up and down, and the head: 118 MB of
distinct fp32 weights, so every call reads its weight from memory as a forward does), called one after another
at 1 to 64 rows on torch's F.linear (MKL), oneDNN on packed weights and the native kernel
(core/model/native_linear.py; left out, saying why, where it cannot run). Median of interleaved passes; the
ratio is native over the faster of the other two.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import cpu_model
from bench.engine import in_fresh_thread
from loramux.core.model.linear_kernels import _onednn_linear, _pack
from loramux.core.model.native_linear import native_linear

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 512, 1376, 8, 8192
SHAPES = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * LAYERS + [
    (VOCAB, HIDDEN)
]  # (out, in): q/k/v and gate/up fused, as the engine runs them
ROWS, PASSES = (1, 4, 8, 16, 32, 64), 15


def kernels(weights: list[torch.Tensor]) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    packed = [_pack(w) for w in weights]
    found: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "torch (MKL)": lambda x, i: F.linear(x, weights[i]),
        "oneDNN": lambda x, i: _onednn_linear(x, packed[i], None),
    }
    native = native_linear()
    if isinstance(native, str):
        print(f"native kernel left out: {native}")
    else:
        found["native"] = lambda x, i: native(x, weights[i], None)
    return found


def run() -> None:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen) * 0.02 for shape in SHAPES]
    nbytes = sum(w.numel() * 4 for w in weights)
    found = kernels(weights)
    print(f"== bench.linear_kernels on {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{len(weights)} linears, {nbytes / 1e6:.0f} MB; ms per decode step's linears (GB/s streamed)")
    with torch.no_grad():
        for rows in ROWS:
            xs = {d: torch.randn(rows, d, generator=gen) for d in (HIDDEN, INTERMEDIATE)}
            for name, fn in found.items():  # same results, to fp32 rounding
                want = F.linear(xs[HIDDEN], weights[1]).double()
                assert torch.allclose(fn(xs[HIDDEN], 1).double(), want, rtol=1e-4, atol=1e-4), name
            samples: dict[str, list[float]] = {name: [] for name in found}
            for _ in range(PASSES):
                for name, fn in found.items():
                    start = time.perf_counter()
                    for i, w in enumerate(weights):
                        fn(xs[w.shape[1]], i)
                    samples[name].append(time.perf_counter() - start)
            median = {name: statistics.median(s) for name, s in samples.items()}
            cells = "  ".join(f"{n} {s * 1e3:6.2f} ({nbytes / s / 1e9:4.1f})" for n, s in median.items())
            ratio = ""
            if "native" in median:
                best_other = min(s for n, s in median.items() if n != "native")
                ratio = f"  native vs the faster other {best_other / median['native']:.2f}x"
            print(f"rows {rows:3d}: {cells}{ratio}", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    in_fresh_thread(run)  # the main thread never runs torch ops (bench.engine.in_fresh_thread)


if __name__ == "__main__":
    main()
